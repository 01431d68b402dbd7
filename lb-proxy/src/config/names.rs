//! Names checked as Kubernetes checks the objects they stand for.
//!
//! A node's name is a Node object's name, which Kubernetes requires to be an
//! RFC 1123 DNS *subdomain* (`ValidateNodeName` is `NameIsDNSSubdomain` in
//! kubernetes/pkg/apis/core/validation/validation.go; the rule is
//! `IsDNS1123Subdomain` in k8s.io/apimachinery/pkg/util/validation): at most
//! 253 characters, lowercase alphanumerics, '-' and '.', and every
//! dot-separated part starting and ending with an alphanumeric. (DNS *labels*,
//! 63 characters and no dots, are for Services and namespaces; a node is
//! commonly named by its hostname, dots included.) A name that passes cannot
//! hold '/', whitespace or anything a metric label or URL would mangle.

/// `IsDNS1123Subdomain`'s length limit.
pub const DNS1123_SUBDOMAIN_MAX_LENGTH: usize = 253;

/// `Ok` when `name` is an RFC 1123 subdomain as Kubernetes defines it
/// (`[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`, at most
/// 253 characters); otherwise what is wrong with it.
pub fn dns1123_subdomain(name: &str) -> Result<(), String> {
    const RULE: &str = "a lowercase RFC 1123 subdomain (as Kubernetes requires of node names) must consist of lowercase alphanumeric characters, '-' or '.', and start and end with an alphanumeric character, e.g. `aks-nodepool1-12345678-vmss000000`";
    if name.is_empty() {
        return Err(format!("must not be empty: {RULE}"));
    }
    if name.len() > DNS1123_SUBDOMAIN_MAX_LENGTH {
        return Err(format!(
            "is {} characters long, more than {DNS1123_SUBDOMAIN_MAX_LENGTH}: {RULE}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Err(format!("`{name}` contains {c:?}: {RULE}"));
    }
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if name
        .split('.')
        .any(|part| !alphanumeric(part.chars().next()) || !alphanumeric(part.chars().last()))
    {
        return Err(format!("`{name}` is not: {RULE}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_kubernetes_accepts_as_a_node_name() {
        let longest = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(longest.len(), 253);
        for ok in [
            "node-1",
            "0",
            "aks-nodepool1-12345678-vmss000000",
            "ip-10-0-1-2.eu-west-1.compute.internal",
            &"x".repeat(100),
            &longest,
        ] {
            assert_eq!(dns1123_subdomain(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn what_kubernetes_refuses_as_a_node_name() {
        let longest = format!("{}a", "a.".repeat(126));
        assert_eq!(dns1123_subdomain(&longest), Ok(()));
        for bad in [
            "",
            "a/b",
            "node 1",
            " node-1",
            "Node-1",
            "node_1",
            "-node",
            "node-",
            ".node",
            "node.",
            "a..b",
            "a.-b",
            "a-.b",
            "nöde",
            &format!("{longest}b"),
            &format!("{longest}.b"),
        ] {
            let err = dns1123_subdomain(bad).expect_err(bad);
            assert!(err.contains("RFC 1123"), "{bad}: {err}");
        }
    }
}
