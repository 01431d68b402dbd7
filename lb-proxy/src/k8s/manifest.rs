//! Reading Service manifests: YAML (several `---` documents) or JSON, a single
//! object or a `kind: List` / `ServiceList` (what `kubectl get svc -o yaml|json`
//! prints). Objects of other kinds (the Deployment next to the Service in the
//! same file) are skipped. Parsed into k8s-openapi's `Service` through
//! serde_path_to_error, so a wrong field is named by its path.

use std::path::Path;

use k8s_openapi::api::core::v1::Service;
use serde::Deserialize;
use serde_json::Value;

use super::error::{K8sError, Location};

/// A Service read from a file, with where it sits there (for error messages).
#[derive(Debug)]
pub struct FoundService {
    /// The file label (with ` (document N)` past the first YAML document).
    pub file: String,
    /// `items[2].` inside a List, empty for a top-level object.
    pub prefix: String,
    pub service: Service,
}

impl FoundService {
    /// The location of `path` inside this Service.
    pub fn at(&self, path: &str) -> Location {
        Location {
            file: self.file.clone(),
            path: format!("{}{path}", self.prefix),
        }
    }
}

/// Reads one file: every Service in it, in order.
pub fn read_file(path: &Path) -> Result<Vec<FoundService>, K8sError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| K8sError::Read {
        file: file.clone(),
        source,
    })?;
    read_str(&file, &text)
}

/// Reads manifests from text (`file` names it in errors).
pub fn read_str(file: &str, text: &str) -> Result<Vec<FoundService>, K8sError> {
    let documents = documents(file, text)?;
    let several = documents.len() > 1;
    let mut found = Vec::new();
    for (n, doc) in documents.into_iter().enumerate() {
        let label = if several && n > 0 {
            format!("{file} (document {})", n + 1)
        } else {
            file.to_string()
        };
        services_in(&label, doc, &mut found)?;
    }
    Ok(found)
}

/// The documents of a file as JSON values: one for JSON, one per `---` for YAML; empty documents dropped.
fn documents(file: &str, text: &str) -> Result<Vec<Value>, K8sError> {
    let parse = |message: String| K8sError::Parse {
        at: Location {
            file: file.to_string(),
            path: String::new(),
        },
        message,
    };
    if text.trim_start().starts_with(['{', '[']) {
        return serde_json::from_str(text)
            .map(|v| vec![v])
            .map_err(|e| parse(format!("not valid JSON: {e}")));
    }
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| parse(format!("not valid YAML: {e}")))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The Services in one document: the object itself, or a List's Service items.
fn services_in(file: &str, doc: Value, found: &mut Vec<FoundService>) -> Result<(), K8sError> {
    let at = |path: &str| Location {
        file: file.to_string(),
        path: path.to_string(),
    };
    let Value::Object(mut object) = doc else {
        return Err(K8sError::Parse {
            at: at(""),
            message: "expected a Kubernetes object (a mapping with kind)".into(),
        });
    };
    let kind = match object.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(_) => {
            return Err(K8sError::Parse {
                at: at("kind"),
                message: "expected a string".into(),
            })
        }
        None => {
            return Err(K8sError::Parse {
                at: at("kind"),
                message: "missing (expected Service, ServiceList or List)".into(),
            })
        }
    };
    match kind.as_str() {
        "Service" | "List" | "ServiceList" => check_api_version(file, "", &object)?,
        _ => return Ok(()),
    }
    match kind.as_str() {
        "Service" => found.push(parse_service(file, String::new(), Value::Object(object))?),
        "List" | "ServiceList" => {
            let items = match object.remove("items") {
                Some(Value::Array(items)) => items,
                Some(Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(K8sError::Parse {
                        at: at("items"),
                        message: "expected a list".into(),
                    })
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                // ServiceList items may omit kind; a List's items carry their own
                // (k8s-openapi checks a present kind/apiVersion says v1 Service).
                let item_kind = item.get("kind").and_then(Value::as_str);
                let is_service =
                    item_kind == Some("Service") || (item_kind.is_none() && kind == "ServiceList");
                if is_service {
                    if let Value::Object(o) = &item {
                        check_api_version(file, &format!("items[{i}]."), o)?;
                    }
                    found.push(parse_service(file, format!("items[{i}]."), item)?);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Services, their lists and `List` are core `v1`; k8s-openapi would refuse another
/// version too, but without the field path.
fn check_api_version(
    file: &str,
    prefix: &str,
    object: &serde_json::Map<String, Value>,
) -> Result<(), K8sError> {
    match object.get("apiVersion") {
        None => Ok(()),
        Some(Value::String(v)) if v == "v1" => Ok(()),
        Some(other) => Err(K8sError::Parse {
            at: Location {
                file: file.to_string(),
                path: format!("{prefix}apiVersion"),
            },
            message: format!("{other}: expected v1"),
        }),
    }
}

fn parse_service(file: &str, prefix: String, value: Value) -> Result<FoundService, K8sError> {
    match serde_path_to_error::deserialize::<_, Service>(value.clone()) {
        Ok(service) => {
            if let Some(path) = unknown_field(&value, &service) {
                return Err(K8sError::Parse {
                    at: Location {
                        file: file.to_string(),
                        path: format!("{prefix}{path}"),
                    },
                    message: "unknown field (kubectl's strict validation refuses it too)".into(),
                });
            }
            Ok(FoundService {
                file: file.to_string(),
                prefix,
                service,
            })
        }
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let message = e.into_inner().to_string();
            Err(K8sError::Parse {
                at: Location {
                    file: file.to_string(),
                    path: format!("{prefix}{path}"),
                },
                message,
            })
        }
    }
}

/// The first field of the input the Service type does not have (a typo such
/// as `sessionAfinity` would otherwise be dropped and its default used): the
/// input's keys compared with the parsed Service written back. Null values
/// are skipped (they parse as absent).
fn unknown_field(input: &Value, service: &Service) -> Option<String> {
    let known = serde_json::to_value(service).ok()?;
    first_unknown(input, &known, String::new())
}

fn first_unknown(input: &Value, known: &Value, path: String) -> Option<String> {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            i.iter().filter(|(_, v)| !v.is_null()).find_map(|(key, v)| {
                let at = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    None => Some(at),
                    Some(kv) => first_unknown(v, kv, at),
                }
            })
        }
        (Value::Array(i), Value::Array(k)) => i
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(n, (v, kv))| first_unknown(v, kv, format!("{path}[{n}]"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: testapp\nspec:\n  type: LoadBalancer\n  ports:\n  - port: 80\n";

    #[test]
    fn yaml_documents_keep_services_and_skip_other_kinds() {
        let text = format!(
            "{SVC}---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: testapp\n---\n"
        );
        let found = read_str("svc.yaml", &text).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].service.metadata.name.as_deref(), Some("testapp"));
    }

    #[test]
    fn json_list_items_are_read_with_their_index() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}},
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":"eighty"}]}}]}"#;
        let e = read_str("l.json", text).unwrap_err().to_string();
        assert!(
            e.starts_with("l.json: items[1].spec.ports[0].port: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn field_path_names_the_bad_field_in_a_later_document() {
        let text = format!(
            "{SVC}---\n{}",
            SVC.replace("port: 80", "port: 80\n    nodePort: [1]")
        );
        let e = read_str("svc.yaml", &text).unwrap_err().to_string();
        assert!(
            e.starts_with("svc.yaml (document 2): spec.ports[0].nodePort: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn missing_kind_and_wrong_api_version_are_errors() {
        let e = read_str("s.yaml", "metadata:\n  name: x\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "s.yaml: kind: missing (expected Service, ServiceList or List)"
        );
        let e = read_str("s.yaml", &SVC.replace("apiVersion: v1", "apiVersion: v2"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "s.yaml: apiVersion: \"v2\": expected v1");
    }

    #[test]
    fn unknown_fields_are_named_not_dropped() {
        let text = SVC.replace(
            "  type: LoadBalancer\n",
            "  type: LoadBalancer\n  sessionAfinity: ClientIP\n",
        );
        let e = read_str("s.yaml", &text).unwrap_err().to_string();
        assert!(
            e.starts_with("s.yaml: spec.sessionAfinity: unknown field"),
            "{e}"
        );
        let text = SVC.replace("- port: 80", "- port: 80\n    nodeport: 30080");
        let e = read_str("s.yaml", &text).unwrap_err().to_string();
        assert!(
            e.starts_with("s.yaml: spec.ports[0].nodeport: unknown field"),
            "{e}"
        );
        let text = SVC.replace(
            "- port: 80",
            "- port: 80\n    targetPort: web\n    appProtocol: null",
        );
        assert!(read_str("s.yaml", &text).is_ok());
    }

    #[test]
    fn service_list_items_without_kind_are_services() {
        let text = "kind: ServiceList\napiVersion: v1\nitems:\n- metadata:\n    name: a\n- metadata:\n    name: b\n";
        let found = read_str("s.yaml", text).unwrap();
        assert_eq!(
            found.iter().map(|f| f.prefix.as_str()).collect::<Vec<_>>(),
            ["items[0].", "items[1]."]
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, reading returns (never panics).
        #[test]
        fn never_panics_on_any_text(text in "\\PC{0,200}") {
            let _ = read_str("fuzz.yaml", &text);
        }

        /// Mangled copies of a real manifest: still no panic.
        #[test]
        fn never_panics_on_mangled_manifests(cut in 0usize..SVC.len(), insert in "[:\\-\\[\\]{}'\" a-z0-9\n]{0,8}") {
            let mut text = SVC.to_string();
            text.insert_str(cut /* SVC is ASCII: every index is a char boundary */, &insert);
            let _ = read_str("fuzz.yaml", &text);
        }
    }
}
