//! `cluster edit`: the new cluster.toml text for an EditClusterRequest.
//! The file is re-serialised from its TOML table (comments are not kept);
//! the caller validates the result as a whole before anything is written.

use tandem_proto::v1;

/// Applies the requested edits to cluster.toml's text. The check interval
/// is VRRP's advertisement interval (`[vrrp] advert_interval_ms`).
pub fn edit_cluster_toml(text: &str, req: &v1::EditClusterRequest) -> Result<String, String> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e| format!("cluster.toml does not parse: {e}"))?;
    if let Some(f) = &req.failback {
        table.insert("failback".into(), toml::Value::String(f.clone()));
    }
    if let Some(ms) = req.check_interval_ms {
        let vrrp = table
            .entry("vrrp")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(vrrp) = vrrp else {
            return Err("cluster.toml: `vrrp` is not a table".into());
        };
        vrrp.insert(
            "advert_interval_ms".into(),
            toml::Value::Integer(i64::from(ms)),
        );
    }
    if req.set_tracked_interfaces {
        table.insert(
            "tracked_interfaces".into(),
            toml::Value::Array(
                req.tracked_interfaces
                    .iter()
                    .map(|i| toml::Value::String(i.clone()))
                    .collect(),
            ),
        );
    }
    toml::to_string(&table).map_err(|e| format!("writing cluster.toml: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "virtual_router_id = 61\nfailback = \"none\"\n\n[vrrp]\nadvert_interval_ms = 100\n\n[[nodes]]\nname = \"lb1\"\naddress = \"192.168.100.1\"\n\n[[nodes]]\nname = \"lb2\"\naddress = \"192.168.100.2\"\n\n[[floating_ips]]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n";

    #[test]
    fn edits_only_what_is_asked() {
        let out = edit_cluster_toml(
            CLUSTER,
            &v1::EditClusterRequest {
                failback: Some("lb1".into()),
                check_interval_ms: Some(200),
                set_tracked_interfaces: true,
                tracked_interfaces: vec!["eth0".into(), "eth1".into()],
            },
        )
        .unwrap();
        let t: toml::Table = out.parse().unwrap();
        assert_eq!(t["failback"].as_str(), Some("lb1"));
        assert_eq!(t["vrrp"]["advert_interval_ms"].as_integer(), Some(200));
        assert_eq!(t["tracked_interfaces"].as_array().unwrap().len(), 2);
        assert_eq!(t["virtual_router_id"].as_integer(), Some(61));
        assert_eq!(t["nodes"].as_array().unwrap().len(), 2);
        let same = edit_cluster_toml(CLUSTER, &v1::EditClusterRequest::default()).unwrap();
        assert_eq!(
            same.parse::<toml::Table>().unwrap(),
            CLUSTER.parse::<toml::Table>().unwrap()
        );
    }

    #[test]
    fn an_unparsable_file_is_an_error() {
        assert!(edit_cluster_toml("x = = 1", &v1::EditClusterRequest::default()).is_err());
    }
}
