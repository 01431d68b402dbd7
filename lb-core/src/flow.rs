//! Flow keys and the distribution modes that decide which of their fields are hashed.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Transport protocol of a flow, numbered as in the IP header so the number can be hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IANA protocol number, which is what goes into the hash.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = ParseModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(ParseModeError {
                input: s.to_owned(),
                expected: "tcp or udp",
            }),
        }
    }
}

/// One flow as the Azure Load Balancer sees it: client address, frontend address, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: Protocol,
}

impl FlowKey {
    pub const fn new(src: SocketAddr, dst: SocketAddr, proto: Protocol) -> Self {
        FlowKey { src, dst, proto }
    }

    pub const fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        FlowKey::new(src, dst, Protocol::Tcp)
    }

    pub const fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        FlowKey::new(src, dst, Protocol::Udp)
    }
}

/// Azure Load Balancer's `loadDistribution`: which fields of the flow pick the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DistributionMode {
    /// `Default`: source IP, source port, destination IP, destination port, protocol.
    #[default]
    FiveTuple = 0,
    /// `SourceIPProtocol`: source IP, destination IP, protocol.
    SourceIpProtocol = 1,
    /// `SourceIP`: source IP, destination IP. AKS uses it for `sessionAffinity: ClientIP`.
    SourceIp = 2,
}

/// The fields of a flow that a mode hashes; the rest are zeroed before hashing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashedFields {
    pub src_ip: bool,
    pub src_port: bool,
    pub dst_ip: bool,
    pub dst_port: bool,
    pub proto: bool,
}

impl DistributionMode {
    pub const ALL: [DistributionMode; 3] = [
        DistributionMode::FiveTuple,
        DistributionMode::SourceIpProtocol,
        DistributionMode::SourceIp,
    ];

    /// The name Azure uses for the mode (`loadDistribution`).
    pub const fn azure_name(self) -> &'static str {
        match self {
            DistributionMode::FiveTuple => "Default",
            DistributionMode::SourceIpProtocol => "SourceIPProtocol",
            DistributionMode::SourceIp => "SourceIP",
        }
    }

    /// The descriptive alias accepted in config.
    pub const fn tuple_name(self) -> &'static str {
        match self {
            DistributionMode::FiveTuple => "five-tuple",
            DistributionMode::SourceIpProtocol => "three-tuple",
            DistributionMode::SourceIp => "two-tuple",
        }
    }

    pub const fn hashed_fields(self) -> HashedFields {
        match self {
            DistributionMode::FiveTuple => HashedFields {
                src_ip: true,
                src_port: true,
                dst_ip: true,
                dst_port: true,
                proto: true,
            },
            DistributionMode::SourceIpProtocol => HashedFields {
                src_ip: true,
                src_port: false,
                dst_ip: true,
                dst_port: false,
                proto: true,
            },
            DistributionMode::SourceIp => HashedFields {
                src_ip: true,
                src_port: false,
                dst_ip: true,
                dst_port: false,
                proto: false,
            },
        }
    }
}

impl fmt::Display for DistributionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.azure_name())
    }
}

/// A distribution mode or protocol name that is not one of the accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value `{input}`: expected {expected}")]
pub struct ParseModeError {
    pub input: String,
    pub expected: &'static str,
}

impl FromStr for DistributionMode {
    type Err = ParseModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Azure's own spelling is case-insensitive in its CLI, so we accept any case here too.
        match s.to_ascii_lowercase().as_str() {
            "default" | "five-tuple" | "5-tuple" => Ok(DistributionMode::FiveTuple),
            "sourceipprotocol" | "three-tuple" | "3-tuple" => {
                Ok(DistributionMode::SourceIpProtocol)
            }
            "sourceip" | "two-tuple" | "2-tuple" => Ok(DistributionMode::SourceIp),
            _ => Err(ParseModeError {
                input: s.to_owned(),
                expected:
                    "Default (five-tuple), SourceIPProtocol (three-tuple) or SourceIP (two-tuple)",
            }),
        }
    }
}

impl Serialize for DistributionMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.azure_name())
    }
}

impl<'de> Deserialize<'de> for DistributionMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_parse_to_the_same_mode() {
        for mode in DistributionMode::ALL {
            assert_eq!(mode.azure_name().parse::<DistributionMode>(), Ok(mode));
            assert_eq!(mode.tuple_name().parse::<DistributionMode>(), Ok(mode));
        }
        assert!("round-robin".parse::<DistributionMode>().is_err());
    }
}
