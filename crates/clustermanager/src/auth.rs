//! Who may call what over the control API, pure: the RPC's path and the
//! `authorization` header in, the key's name and role (or a refusal) out.
//!
//! A caller presents `authorization: Bearer <token>`. node.toml stores only
//! the SHA-256 of each token (`[[api_keys]] sha256`); the presented token is
//! hashed and compared with every stored hash in constant time, all of them
//! every time, so neither the timing of a refusal nor that of a success
//! says how much of a hash matched or which key it was.
//!
//! The local Unix socket (root only, mode 0600) needs no token: this module
//! guards the TCP listener alone.

use tandem_config::{ApiKey, ApiRole};

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read key (or an admin key).
    Read,
    /// An admin key; the call is logged with the key's name.
    Admin,
    /// Never over the control API: the peers' own RPCs (they arrive
    /// through the SSH trust, on the Unix socket).
    PeerOnly,
}

/// The gRPC service whose methods this table classifies.
pub const SERVICE: &str = "tandem.v1.ClusterManager";

/// Every RPC of the ClusterManager service and what it needs. A method not
/// listed is refused (a unit test checks that every `rpc` of
/// cluster_manager.proto is listed, so a new RPC is classified on purpose).
pub const METHODS: &[(&str, Access)] = &[
    ("Status", Access::Read),
    ("DaemonStatuses", Access::Read),
    ("ListFarms", Access::Read),
    ("ReadConfig", Access::Read),
    ("ShowCluster", Access::Read),
    ("ListNodes", Access::Read),
    ("WatchEvents", Access::Read),
    ("Reload", Access::Admin),
    ("PeerHostKey", Access::Admin),
    ("CreateCluster", Access::Admin),
    ("AddNode", Access::Admin),
    ("RemoveNode", Access::Admin),
    ("EditCluster", Access::Admin),
    ("DestroyCluster", Access::Admin),
    ("SetNodeMaintenance", Access::Admin),
    ("ApplyChange", Access::Admin),
    ("ReplicateChange", Access::PeerOnly),
    ("Preflight", Access::PeerOnly),
];

/// The method name of a gRPC request path (`/tandem.v1.ClusterManager/ApplyChange`
/// → `ApplyChange`), when it is one of this service's.
pub fn method_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (service == SERVICE && !method.is_empty() && !method.contains('/')).then_some(method)
}

/// What `method` needs; None for a method this service does not have.
pub fn access_of(method: &str) -> Option<Access> {
    METHODS
        .iter()
        .find(|(m, _)| *m == method)
        .map(|(_, access)| *access)
}

/// A caller that may make the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The key's name (`[[api_keys]] name`).
    pub key: String,
    pub role: ApiRole,
    pub access: Access,
}

/// Why a call is refused; the Display is what the caller reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "this control API needs an API key: send `authorization: Bearer <token>` (tandemctl --api-key-file FILE); keys are [[api_keys]] in the node's node.toml"
    )]
    NoToken,
    #[error("malformed authorization header: expected `Bearer <token>`")]
    Malformed,
    #[error("unknown API key (no [[api_keys]] entry of this node has its SHA-256)")]
    UnknownKey,
    #[error(
        "API key `{key}` has the read role; {method} changes the cluster and needs an admin key"
    )]
    ReadOnly { key: String, method: String },
    #[error("{method} is the peers' own call and is not served over the control API")]
    PeerOnly { method: String },
    #[error("no method `{path}` in the control API")]
    NoSuchMethod { path: String },
}

impl Denied {
    /// Whether the caller is not known (UNAUTHENTICATED) rather than known
    /// and not allowed (PERMISSION_DENIED) or asking for nothing that
    /// exists (UNIMPLEMENTED).
    pub fn code(&self) -> tonic::Code {
        match self {
            Denied::NoToken | Denied::Malformed | Denied::UnknownKey => {
                tonic::Code::Unauthenticated
            }
            Denied::ReadOnly { .. } | Denied::PeerOnly { .. } => tonic::Code::PermissionDenied,
            Denied::NoSuchMethod { .. } => tonic::Code::Unimplemented,
        }
    }

    /// A short word for logs and rate limiting.
    pub fn kind(&self) -> &'static str {
        match self {
            Denied::NoToken => "no API key",
            Denied::Malformed => "malformed authorization header",
            Denied::UnknownKey => "unknown API key",
            Denied::ReadOnly { .. } => "read key calling a change",
            Denied::PeerOnly { .. } => "peer-only method",
            Denied::NoSuchMethod { .. } => "no such method",
        }
    }
}

/// SHA-256 of a token, as node.toml stores it (64 lowercase hex digits).
#[cfg(test)]
pub fn token_sha256_hex(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

#[cfg(test)]
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Equality of two digests in time independent of where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

/// The key whose stored hash is the token's, if any. Every key is compared,
/// whatever matched before.
pub fn find_key<'k>(keys: &'k [ApiKey], token: &str) -> Option<&'k ApiKey> {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut presented = [0u8; 32];
    presented.copy_from_slice(digest.as_ref());
    let mut found = None;
    for k in keys {
        // Validation guarantees 64 hex digits; a key that is not is never
        // matched.
        let stored = unhex(&k.sha256);
        let equal = stored.is_some_and(|s| constant_time_eq(&s, &presented));
        if equal && found.is_none() {
            found = Some(k);
        }
    }
    found
}

/// Decides one call: `path` is the request's `:path`, `authorization` the
/// header's value if any.
pub fn authorize(
    keys: &[ApiKey],
    path: &str,
    authorization: Option<&str>,
) -> Result<Grant, Denied> {
    let token = match authorization {
        None => return Err(Denied::NoToken),
        Some(h) => {
            let (scheme, token) = h.trim().split_once(' ').ok_or(Denied::Malformed)?;
            if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
                return Err(Denied::Malformed);
            }
            token.trim()
        }
    };
    // The key first: an unknown caller learns nothing about the methods.
    let key = find_key(keys, token).ok_or(Denied::UnknownKey)?;
    let Some(method) = method_of(path) else {
        return Err(Denied::NoSuchMethod {
            path: path.to_owned(),
        });
    };
    let access = access_of(method).ok_or_else(|| Denied::NoSuchMethod {
        path: path.to_owned(),
    })?;
    match (access, key.role) {
        (Access::PeerOnly, _) => Err(Denied::PeerOnly {
            method: method.to_owned(),
        }),
        (Access::Admin, ApiRole::Read) => Err(Denied::ReadOnly {
            key: key.name.clone(),
            method: method.to_owned(),
        }),
        (access, role) => Ok(Grant {
            key: key.name.clone(),
            role,
            access,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ_TOKEN: &str = "tdm_read-token";
    const ADMIN_TOKEN: &str = "tdm_admin-token";

    fn keys() -> Vec<ApiKey> {
        vec![
            ApiKey {
                name: "monitoring".into(),
                sha256: token_sha256_hex(READ_TOKEN),
                role: ApiRole::Read,
            },
            ApiKey {
                name: "deploy".into(),
                sha256: token_sha256_hex(ADMIN_TOKEN),
                role: ApiRole::Admin,
            },
        ]
    }

    fn path(m: &str) -> String {
        format!("/{SERVICE}/{m}")
    }

    #[test]
    fn the_stored_hash_is_what_sha256sum_prints() {
        // printf %s test | sha256sum
        assert_eq!(
            token_sha256_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn no_token_a_wrong_token_and_a_malformed_header_are_refused() {
        let k = keys();
        let p = path("Status");
        assert_eq!(authorize(&k, &p, None), Err(Denied::NoToken));
        assert_eq!(
            authorize(&k, &p, Some("Bearer nope")),
            Err(Denied::UnknownKey)
        );
        assert_eq!(authorize(&k, &p, Some(READ_TOKEN)), Err(Denied::Malformed));
        assert_eq!(
            authorize(&k, &p, Some("Basic dXNlcjpwYXNz")),
            Err(Denied::Malformed)
        );
        assert_eq!(authorize(&k, &p, Some("Bearer ")), Err(Denied::Malformed));
        // No keys at all: every token is unknown.
        assert_eq!(
            authorize(&[], &p, Some(&format!("Bearer {ADMIN_TOKEN}"))),
            Err(Denied::UnknownKey)
        );
        for d in [Denied::NoToken, Denied::Malformed, Denied::UnknownKey] {
            assert_eq!(d.code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn a_read_key_reads_and_may_not_change() {
        let k = keys();
        let read = format!("Bearer {READ_TOKEN}");
        for m in [
            "Status",
            "ListNodes",
            "ListFarms",
            "ReadConfig",
            "WatchEvents",
        ] {
            let g = authorize(&k, &path(m), Some(&read)).unwrap();
            assert_eq!((g.key.as_str(), g.access), ("monitoring", Access::Read));
        }
        let e = authorize(&k, &path("ApplyChange"), Some(&read)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.to_string(),
            "API key `monitoring` has the read role; ApplyChange changes the cluster and needs an admin key"
        );
    }

    #[test]
    fn an_admin_key_changes_and_nobody_calls_the_peers_rpcs() {
        let k = keys();
        let admin = format!("bearer  {ADMIN_TOKEN} ");
        let g = authorize(&k, &path("ApplyChange"), Some(&admin)).unwrap();
        assert_eq!(
            g,
            Grant {
                key: "deploy".into(),
                role: ApiRole::Admin,
                access: Access::Admin
            }
        );
        for m in ["ReplicateChange", "Preflight"] {
            let e = authorize(&k, &path(m), Some(&admin)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{m}");
        }
        let e = authorize(&k, "/tandem.v1.Vrrpd/SetMaintenance", Some(&admin)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        let e = authorize(&k, &path("NoSuchThing"), Some(&admin)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
    }

    #[test]
    fn a_key_whose_hash_is_not_hex_never_matches() {
        let k = vec![ApiKey {
            name: "broken".into(),
            sha256: "z".repeat(64),
            role: ApiRole::Admin,
        }];
        assert_eq!(find_key(&k, "anything"), None);
    }

    /// Every `rpc` of cluster_manager.proto is classified: a new RPC must be
    /// given a role here before it can be called over the control API.
    #[test]
    fn every_rpc_of_the_service_is_classified() {
        let proto = include_str!("../../../proto/tandem/v1/cluster_manager.proto");
        let rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .map(str::trim)
            .collect();
        assert!(rpcs.len() >= 10, "{rpcs:?}");
        for rpc in &rpcs {
            assert!(
                access_of(rpc).is_some(),
                "rpc {rpc} of cluster_manager.proto has no entry in auth::METHODS"
            );
        }
        for (m, _) in METHODS {
            assert!(rpcs.contains(m), "auth::METHODS lists {m}, not an rpc");
        }
    }
}
