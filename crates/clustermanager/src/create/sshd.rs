//! Preflight of each node's sshd, read with `sshd -T` (the effective
//! configuration, `Match` blocks applied for a root login from the other
//! node): it must read the cluster key from Tandem's authorized_keys file,
//! let root in with a key, forward stream-local sockets (the peer's
//! clustermanager is reached that way) and serve SFTP (cfg-syncd). A node
//! whose sshd would refuse the cluster key is found here, before anything
//! is written, instead of after the password was used.

use std::net::IpAddr;
use std::path::Path;

use super::facts::run_local;

/// The sshd settings the pair depends on, from `sshd -T`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshdFacts {
    /// `authorizedkeysfile`, as written (tokens such as `%h` unexpanded).
    pub authorized_keys_files: Vec<String>,
    pub permit_root_login: String,
    pub pubkey_authentication: String,
    pub allow_stream_local_forwarding: String,
    pub sftp: bool,
}

/// Parses `sshd -T` output (lower-case keyword, space, value).
pub fn parse(dump: &str) -> SshdFacts {
    let mut f = SshdFacts::default();
    for line in dump.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "authorizedkeysfile" => {
                f.authorized_keys_files = value.split_whitespace().map(str::to_owned).collect();
            }
            "permitrootlogin" => f.permit_root_login = value.trim().to_owned(),
            "pubkeyauthentication" => f.pubkey_authentication = value.trim().to_owned(),
            "allowstreamlocalforwarding" => {
                f.allow_stream_local_forwarding = value.trim().to_owned();
            }
            "subsystem" => f.sftp |= value.split_whitespace().next() == Some("sftp"),
            _ => {}
        }
    }
    f
}

/// An `AuthorizedKeysFile` entry as sshd resolves it for root: `%%`, `%u`,
/// `%h` expanded, a relative path taken from root's home.
fn resolve_for_root(entry: &str) -> String {
    let expanded = entry
        .replace("%%", "\u{0}")
        .replace("%u", "root")
        .replace("%h", "/root")
        .replace("%U", "0")
        .replace('\u{0}', "%");
    if expanded.starts_with('/') {
        expanded
    } else {
        format!("/root/{expanded}")
    }
}

/// What would stop the cluster key from working on `node`; empty when
/// nothing does.
pub fn problems(node: &str, f: &SshdFacts, authorized_keys: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let want = authorized_keys.display().to_string();
    if !f
        .authorized_keys_files
        .iter()
        .any(|e| resolve_for_root(e) == want)
    {
        out.push(format!(
            "{node}'s sshd does not read {want} (its AuthorizedKeysFile is `{}`): the cluster key is authorized there; add it, e.g. with the drop-in /etc/ssh/sshd_config.d/tandem.conf the Tandem package ships (`AuthorizedKeysFile .ssh/authorized_keys {want}`), and reload sshd",
            f.authorized_keys_files.join(" ")
        ));
    }
    if matches!(f.permit_root_login.as_str(), "no" | "forced-commands-only") {
        out.push(format!(
            "{node}'s sshd has PermitRootLogin {}: the cluster logs in as root with its key; set `PermitRootLogin prohibit-password` (or yes, for the password of cluster creation)",
            f.permit_root_login
        ));
    }
    if f.pubkey_authentication == "no" {
        out.push(format!(
            "{node}'s sshd has PubkeyAuthentication no: the cluster authenticates with its key"
        ));
    }
    if matches!(f.allow_stream_local_forwarding.as_str(), "no" | "remote") {
        out.push(format!(
            "{node}'s sshd has AllowStreamLocalForwarding {}: the peer's clustermanager is reached through a forwarded Unix socket; set it to yes (OpenSSH's default)",
            f.allow_stream_local_forwarding
        ));
    }
    if !f.sftp {
        out.push(format!(
            "{node}'s sshd has no sftp subsystem: cfg-syncd replicates the configuration over SFTP (`Subsystem sftp /usr/lib/openssh/sftp-server`)"
        ));
    }
    out
}

/// The `sshd -T` command for `config`, evaluating `Match` blocks for a root
/// login from `from` to `to:port`.
pub fn command(config: &Path, from: IpAddr, to: IpAddr, port: u16) -> Vec<String> {
    vec![
        "/usr/sbin/sshd".into(),
        "-T".into(),
        "-f".into(),
        config.display().to_string(),
        "-C".into(),
        format!("user=root,host={from},addr={from},laddr={to},lport={port}"),
    ]
}

/// This node's sshd, as the peer (at `from`) will find it.
pub async fn local(
    config: &Path,
    from: IpAddr,
    to: IpAddr,
    port: u16,
) -> Result<SshdFacts, String> {
    let cmd = command(config, from, to, port);
    let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    run_local(&cmd[0], &args)
        .await
        .map(|out| parse(&out))
        .map_err(|e| format!("reading this node's sshd configuration: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "port 22\npermitrootlogin without-password\npubkeyauthentication yes\n\
        allowstreamlocalforwarding yes\nauthorizedkeysfile .ssh/authorized_keys .ssh/authorized_keys2\n\
        subsystem sftp /usr/lib/openssh/sftp-server\n";

    #[test]
    fn a_stock_sshd_lacks_only_tandems_authorized_keys() {
        let f = parse(DEBIAN);
        assert_eq!(
            f.authorized_keys_files,
            [".ssh/authorized_keys", ".ssh/authorized_keys2"]
        );
        let p = problems("lb2", &f, Path::new("/etc/tandem/ssh/authorized_keys"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("lb2's sshd does not read /etc/tandem/ssh/authorized_keys (its AuthorizedKeysFile is `.ssh/authorized_keys .ssh/authorized_keys2`)"),
            "{}",
            p[0]
        );
        // With the drop-in.
        let f = parse(&DEBIAN.replace(".ssh/authorized_keys2", "/etc/tandem/ssh/authorized_keys"));
        assert!(problems("lb2", &f, Path::new("/etc/tandem/ssh/authorized_keys")).is_empty());
        // Root's own file, named with a token, is found too.
        let f = parse(&DEBIAN.replace(".ssh/authorized_keys2", "%h/.ssh/tandem_keys"));
        assert!(problems("lb2", &f, Path::new("/root/.ssh/tandem_keys")).is_empty());
    }

    #[test]
    fn settings_that_lock_the_cluster_out_are_named() {
        let f = parse(
            "permitrootlogin no\npubkeyauthentication no\nallowstreamlocalforwarding no\n\
             authorizedkeysfile /etc/tandem/ssh/authorized_keys\n",
        );
        let p = problems("lb1", &f, Path::new("/etc/tandem/ssh/authorized_keys"));
        let all = p.join("\n");
        for part in [
            "PermitRootLogin no",
            "PubkeyAuthentication no",
            "AllowStreamLocalForwarding no",
            "no sftp subsystem",
        ] {
            assert!(all.contains(part), "{part}: {all}");
        }
        assert_eq!(p.len(), 4);
    }
}
