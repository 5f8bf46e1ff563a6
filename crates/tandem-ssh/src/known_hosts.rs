//! OpenSSH `known_hosts`: reading the keys pinned for a host, writing a line.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use russh::keys::PublicKey;

use crate::SshError;

/// The known_hosts line pinning `key_line` (`type base64 [comment]`) for
/// `host:port`: plain `host` on port 22, `[host]:port` otherwise, as
/// OpenSSH writes them.
pub fn known_hosts_line(host: IpAddr, port: u16, key_line: &str) -> String {
    let pattern = if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    };
    let mut f = key_line.split_whitespace();
    let alg = f.next().unwrap_or_default();
    let b64 = f.next().unwrap_or_default();
    format!("{pattern} {alg} {b64}\n")
}

/// The host keys pinned for `addr` in a known_hosts file: plain `host`,
/// `[host]:port` and hashed (`|1|salt|hash`) entries are understood.
/// `peer` names the peer in errors.
pub fn pinned_keys(path: &Path, addr: SocketAddr, peer: &str) -> Result<Vec<PublicKey>, SshError> {
    let host = addr.ip().to_string();
    let no_pin = |why: String| SshError::NoPin {
        peer: peer.to_owned(),
        host: host.clone(),
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| no_pin(e.to_string()))?;
    let bracketed = format!("[{host}]:{}", addr.port());
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(_alg), Some(b64)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // OpenSSH: a plain `host` pattern only matches port 22.
        let matches = hosts.split(',').any(|h| {
            (h == host && addr.port() == 22)
                || h == bracketed
                || (addr.port() == 22 && hashed_match(h, &host))
                || hashed_match(h, &bracketed)
        });
        if matches {
            let key = russh::keys::parse_public_key_base64(b64)
                .map_err(|e| no_pin(format!("unreadable key for {hosts}: {e}")))?;
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err(no_pin("no line names this host".into()));
    }
    Ok(keys)
}

/// OpenSSH's hashed host names: `|1|base64(salt)|base64(HMAC-SHA1(salt, host))`.
fn hashed_match(entry: &str, host: &str) -> bool {
    use ring::hmac;
    let Some(rest) = entry.strip_prefix("|1|") else {
        return false;
    };
    let Some((salt, hash)) = rest.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64_decode(salt), b64_decode(hash)) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    hmac::verify(&key, host.as_bytes(), &hash).is_ok()
}

fn b64_decode(s: &str) -> Result<Vec<u8>, ()> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).ok_or(())?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKQ5W2r2Gh8wnYoF6v2eG4yRj6DpzPz1d0iTo1cbgHwV";

    #[test]
    fn hashed_known_hosts_entries_match_their_host_only() {
        // `ssh-keygen -H` of "10.0.0.2" with this salt.
        use ring::hmac;
        let salt = [7u8; 20];
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        let tag = hmac::sign(&key, b"10.0.0.2");
        let entry = format!("|1|{}|{}", b64(&salt), b64(tag.as_ref()));
        assert!(hashed_match(&entry, "10.0.0.2"));
        assert!(!hashed_match(&entry, "10.0.0.3"));
    }

    fn b64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    #[test]
    fn b64_roundtrip() {
        for data in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            &[0xff, 0, 0x10, 0x80],
        ] {
            assert_eq!(b64_decode(&b64(data)).unwrap(), data);
        }
    }

    #[test]
    fn a_missing_pin_is_an_error_not_trust_on_first_use() {
        let tmp = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "10.0.0.2:22".parse().unwrap();
        let e = pinned_keys(&tmp.path().join("known_hosts"), addr, "lb2").unwrap_err();
        assert!(e.is_host_key(), "{e}");
        std::fs::write(tmp.path().join("known_hosts"), format!("10.0.0.9 {KEY}\n")).unwrap();
        let e = pinned_keys(&tmp.path().join("known_hosts"), addr, "lb2").unwrap_err();
        assert!(e.to_string().contains("no line names this host"), "{e}");
    }

    #[test]
    fn a_written_line_is_read_back_for_its_host_and_port_only() {
        let tmp = tempfile::tempdir().unwrap();
        let kh = tmp.path().join("known_hosts");
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        std::fs::write(
            &kh,
            known_hosts_line(ip, 22, &format!("{KEY} root@lb2")) + &known_hosts_line(ip, 2222, KEY),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&kh)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
            format!("10.0.0.2 {KEY}")
        );
        for port in [22, 2222] {
            let keys = pinned_keys(&kh, SocketAddr::new(ip, port), "lb2").unwrap();
            assert_eq!(keys.len(), 1, "port {port}");
        }
        assert!(pinned_keys(&kh, SocketAddr::new(ip, 2223), "lb2").is_err());
        assert!(pinned_keys(&kh, "10.0.0.3:22".parse().unwrap(), "lb2").is_err());
    }
}
