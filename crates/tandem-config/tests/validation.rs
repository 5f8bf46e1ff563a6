//! The rules beyond types: ranges, uniqueness, and consistency within a file
//! and across files, each error at the offending value's line and column.

mod common;

use common::{NODE, WEB, cluster_with, dir, errors, one_error, web_with};
use tandem_config::Config;

// ---- farms ----

#[test]
fn a_duplicate_backend_is_named() {
    let e = one_error(&[("farms/web.toml", &WEB.replace("10.1.0.12", "10.1.0.11"))]);
    assert_eq!(
        e,
        "farms/web.toml:14:1: farm `web`: backend 10.1.0.11:8080 appears twice"
    );
}

#[test]
fn a_backend_without_port_is_the_same_as_one_on_the_farms_port() {
    let farm = format!(
        "{WEB}\n[[backends]]\naddress = \"10.1.0.11\"\nport = 80\n\n[[backends]]\naddress = \"10.1.0.11\"\n"
    );
    let e = one_error(&[("farms/web.toml", &farm)]);
    assert_eq!(
        e,
        "farms/web.toml:22:1: farm `web`: backend 10.1.0.11:80 appears twice"
    );
}

#[test]
fn a_timeout_not_shorter_than_the_interval_is_refused() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("timeout_ms = 1000", "timeout_ms = 3000"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:8:14: farm `web`: timeout_ms (3000) must be less than interval_ms (2000)"
    );
}

#[test]
fn an_out_of_range_interval_is_named_with_its_range() {
    let farm = web_with("interval_ms = 2000", "interval_ms = 50")
        .replace("timeout_ms = 1000", "timeout_ms = 20");
    let e = one_error(&[("farms/web.toml", &farm)]);
    assert_eq!(
        e,
        "farms/web.toml:7:15: farm `web`: interval_ms 50 is out of range (100-3600000)"
    );
    // Left at its 1000 ms, the timeout is now also too long: both are said.
    let d = dir(&[(
        "farms/web.toml",
        &web_with("interval_ms = 2000", "interval_ms = 50"),
    )]);
    assert_eq!(
        errors(d.path()),
        [
            "farms/web.toml:7:15: farm `web`: interval_ms 50 is out of range (100-3600000)",
            "farms/web.toml:8:14: farm `web`: timeout_ms (1000) must be less than interval_ms (50)",
        ]
    );
}

#[test]
fn a_vrrp_interval_must_fit_the_wire_format() {
    let e = one_error(&[(
        "cluster.toml",
        &cluster_with("advert_interval_ms = 100", "advert_interval_ms = 5"),
    )]);
    assert_eq!(
        e,
        "cluster.toml:5:22: cluster: advert_interval_ms 5 must be 10-40950 in steps of 10 with VRRPv3"
    );
    let e = one_error(&[(
        "cluster.toml",
        &cluster_with("advert_interval_ms = 100", "advert_interval_ms = 105"),
    )]);
    assert!(e.starts_with("cluster.toml:5:22: "), "{e}");
    let e = one_error(&[(
        "cluster.toml",
        &cluster_with(
            "advert_interval_ms = 100",
            "version = 2\nadvert_interval_ms = 1500",
        ),
    )]);
    assert_eq!(
        e,
        "cluster.toml:6:22: cluster: advert_interval_ms 1500 must be whole seconds, 1000-255000, with VRRPv2"
    );
}

#[test]
fn conntrack_sync_limits_are_checked_with_their_ranges() {
    let e = one_error(&[(
        "cluster.toml",
        &format!("{}\n[sync]\nconntrack_queue_limit = 100\n", common::CLUSTER),
    )]);
    assert_eq!(
        e,
        "cluster.toml:24:25: cluster: conntrack_queue_limit 100 is out of range (1024-16777216 entries)"
    );
    let e = one_error(&[(
        "cluster.toml",
        &format!(
            "{}\n[sync]\nconntrack_lag_threshold_ms = 5\n",
            common::CLUSTER
        ),
    )]);
    assert_eq!(
        e,
        "cluster.toml:24:30: cluster: conntrack_lag_threshold_ms 5 is out of range (10-600000)"
    );
    let e = one_error(&[(
        "cluster.toml",
        &format!("{}\n[sync]\norphan_grace_ms = 60000\n", common::CLUSTER),
    )]);
    assert_eq!(
        e,
        "cluster.toml:24:19: cluster: orphan_grace_ms 60000 is out of range (0-10000)"
    );
    let d = dir(&[(
        "cluster.toml",
        &format!(
            "{}\n[sync]\nconntrack_queue_limit = 50000\nconntrack_lag_threshold_ms = 250\norphan_grace_ms = 0\n",
            common::CLUSTER
        ),
    )]);
    let c = Config::load(d.path()).expect("valid");
    let sync = &c.cluster.expect("clustered").sync;
    assert_eq!(
        (
            sync.conntrack_queue_limit,
            sync.conntrack_lag_threshold_ms,
            sync.orphan_grace_ms
        ),
        (50000, 250, 0)
    );
}

#[test]
fn the_vrrp_fault_handling_keys_are_range_checked_at_their_position() {
    for (key, bad, message) in [
        (
            "garp_lower_prio_repeat",
            "101",
            "cluster: garp_lower_prio_repeat 101 is out of range (0-100)",
        ),
        (
            "garp_lower_prio_delay_ms",
            "3600001",
            "cluster: garp_lower_prio_delay_ms 3600001 is out of range (0-3600000)",
        ),
        (
            "garp_refresh_s",
            "86401",
            "cluster: garp_refresh_s 86401 is out of range (0-86400)",
        ),
        (
            "preempt_delay_s",
            "1001",
            "cluster: preempt_delay_s 1001 is out of range (0-1000)",
        ),
        (
            "floating_ip_lifetime_s",
            "3601",
            "cluster: floating_ip_lifetime_s 3601 is out of range (0-3600)",
        ),
        (
            "handover_timeout_ms",
            "60001",
            "cluster: handover_timeout_ms 60001 is out of range (0-60000)",
        ),
        (
            "rt_priority",
            "100",
            "cluster: rt_priority 100 is out of range (0-99)",
        ),
    ] {
        let e = one_error(&[(
            "cluster.toml",
            &cluster_with(
                "advert_interval_ms = 100",
                &format!("advert_interval_ms = 100\n{key} = {bad}"),
            ),
        )]);
        let col = key.len() + 4;
        assert_eq!(e, format!("cluster.toml:6:{col}: {message}"), "{key}");
    }
    // Off switches are valid values.
    let d = dir(&[(
        "cluster.toml",
        &cluster_with(
            "advert_interval_ms = 100",
            "advert_interval_ms = 100\ngarp_lower_prio_repeat = 0\nfloating_ip_lifetime_s = 0\n\
             rt_priority = 0\nmembers_only = false\npreempt_delay_s = 0",
        ),
    )]);
    let c = Config::load(d.path()).expect("valid");
    let v = c.cluster.expect("clustered").vrrp;
    assert_eq!(v.garp_lower_prio_repeat, 0);
    assert_eq!(v.floating_ip_lifetime_s, Some(0));
    assert!(!v.members_only);
}

#[test]
fn a_bad_port_range_is_refused() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("port = 80\n", "port = \"90-80\"\n"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:3:8: port range `90-80` ends before it starts"
    );
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("port = 80\n", "port = \"0-80\"\n"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:3:8: `0-80` is not a port (1-65535) or a range \"lo-hi\""
    );
    let e = one_error(&[("farms/web.toml", &web_with("port = 80\n", "port = 70000\n"))]);
    assert_eq!(
        e,
        "farms/web.toml:3:8: port 70000 is out of range: expected a port (1-65535) or a range \"lo-hi\""
    );
}

#[test]
fn a_farm_must_be_in_the_file_of_its_name() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("name = \"web\"", "name = \"www\""),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:1:8: farm `www` must be in a file named www.toml, not web.toml"
    );
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("name = \"web\"", "name = \"web.1\""),
    )]);
    assert!(
        e.starts_with(
            "farms/web.toml:1:8: farm name `web.1` must be 1-32 of A-Z, a-z, 0-9, '_' and '-'"
        ),
        "{e}"
    );
}

#[test]
fn the_same_farm_in_two_files_is_refused() {
    // other.toml holds a second `web` (on another port): both the misnaming
    // and the duplicate are reported, the latter naming the first file.
    let d = dir(&[("farms/other.toml", &web_with("port = 80\n", "port = 81\n"))]);
    assert_eq!(
        errors(d.path()),
        [
            "farms/other.toml:1:8: farm `web` must be in a file named web.toml, not other.toml",
            "farms/web.toml:1:8: farm `web` is defined twice: here and in farms/other.toml",
        ]
    );
}

#[test]
fn overlapping_listeners_are_refused() {
    let d = dir(&[(
        "farms/web2.toml",
        &web_with("name = \"web\"", "name = \"web2\"").replacen(
            "port = 80\n",
            "port = \"70-90\"\n",
            1,
        ),
    )]);
    assert_eq!(
        errors(d.path()),
        [
            "farms/web2.toml:3:8: farms `web` and `web2` both listen on 10.0.0.100:80/tcp (`web` is in farms/web.toml)"
        ]
    );
    // A tcp+udp range collides with a tcp farm on a port inside it.
    let d = dir(&[(
        "farms/dns.toml",
        &web_with("name = \"web\"", "name = \"dns\"").replacen(
            "port = 80\n",
            "port = \"53-80\"\nprotocol = \"both\"\n",
            1,
        ),
    )]);
    let e = errors(d.path());
    assert_eq!(
        e,
        [
            "farms/web.toml:3:8: farms `dns` and `web` both listen on 10.0.0.100:80/tcp (`dns` is in farms/dns.toml)"
        ]
    );
}

#[test]
fn the_same_port_with_another_protocol_or_vip_does_not_collide() {
    let udp = web_with("name = \"web\"", "name = \"web-udp\"")
        .replacen("port = 80\n", "port = 80\nprotocol = \"udp\"\n", 1)
        .replacen("[health_check]\n", "[health_check]\nkind = \"none\"\n", 1);
    let other_vip = web_with("name = \"web\"", "name = \"web-b\"").replacen(
        "vip = \"10.0.0.100\"",
        "vip = \"10.0.0.101\"",
        1,
    );
    let cluster = format!(
        "{}\n[[floating_ips]]\naddress = \"10.0.0.101/24\"\ninterface = \"eth0\"\n",
        common::CLUSTER
    );
    let d = dir(&[
        ("farms/web-udp.toml", &udp),
        ("farms/web-b.toml", &other_vip),
        ("cluster.toml", &cluster),
    ]);
    let c = Config::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.farms.len(), 3);
}

#[test]
fn snat_to_a_non_floating_address_is_refused_with_the_reason() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_with(
            "snat_address = \"10.1.0.100\"",
            "snat_address = \"10.1.0.1\"",
        ),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:4:16: farm `web`: snat_address 10.1.0.1 is not a floating IP of the cluster \
         (10.0.0.100, 10.1.0.100): the SNAT source must move with the VIP, or the backends answer \
         the dead node after failover"
    );
}

#[test]
fn a_vip_that_is_not_floating_is_refused() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("vip = \"10.0.0.100\"", "vip = \"10.0.0.5\""),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:2:7: farm `web`: vip 10.0.0.5 is not a floating IP of the cluster \
         (10.0.0.100, 10.1.0.100): it would not move at failover"
    );
}

#[test]
fn a_standalone_node_does_not_need_floating_addresses() {
    let d = dir(&[("node.toml", "name = \"solo\"\n")]);
    std::fs::remove_file(d.path().join("cluster.toml")).expect("rm");
    let farm = web_with("vip = \"10.0.0.100\"", "vip = \"10.0.0.5\"");
    std::fs::write(d.path().join("farms/web.toml"), farm).expect("write");
    Config::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn nat_needs_snat_and_dsr_refuses_it() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("snat_address = \"10.1.0.100\"\n", ""),
    )]);
    assert!(
        e.starts_with("farms/web.toml:1:1: farm `web`: NAT forwarding needs snat_address"),
        "{e}"
    );
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("port = 80\n", "port = 80\nforwarding = \"dsr\"\n").replace("port = 8080\n", ""),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:5:16: farm `web`: direct server return does not translate addresses; remove snat_address"
    );
}

#[test]
fn dsr_cannot_change_the_port() {
    let farm = web_with("snat_address = \"10.1.0.100\"\n", "forwarding = \"dsr\"\n");
    let d = dir(&[("farms/web.toml", &farm)]);
    assert_eq!(
        errors(d.path()),
        [
            "farms/web.toml:12:8: farm `web`: with direct server return a backend cannot use another port than the farm's",
            "farms/web.toml:16:8: farm `web`: with direct server return a backend cannot use another port than the farm's",
        ]
    );
}

#[test]
fn dsr_refuses_least_connections() {
    let farm = web_with(
        "snat_address = \"10.1.0.100\"\n",
        "forwarding = \"dsr\"\nscheduler = \"lc\"\n",
    )
    .replace("port = 8080\n", "");
    let e = one_error(&[("farms/web.toml", &farm)]);
    assert!(
        e.starts_with("farms/web.toml:5:13: farm `web`: least connections cannot be used with direct server return"),
        "{e}"
    );
}

#[test]
fn a_udp_farm_cannot_use_a_tcp_check() {
    let farm = web_with("port = 80\n", "port = 80\nprotocol = \"udp\"\n");
    let e = one_error(&[("farms/web.toml", &farm)]);
    assert_eq!(
        e,
        "farms/web.toml:4:12: farm `web`: health check kind `tcp` probes over TCP, but the farm is udp-only; \
         set [health_check] kind = \"command\" (a script that speaks the protocol) or \"none\" \
         (tcp is the default)"
    );
    // With an explicit check, the error points at its kind.
    let farm = farm.replacen("[health_check]\n", "[health_check]\nkind = \"http\"\n", 1);
    let e = one_error(&[("farms/web.toml", &farm)]);
    assert!(
        e.starts_with("farms/web.toml:8:8: farm `web`: health check kind `http` probes over TCP"),
        "{e}"
    );
}

#[test]
fn http_settings_belong_to_http_checks() {
    let farm = web_with(
        "interval_ms = 2000\n",
        "interval_ms = 2000\npath = \"/health\"\n",
    );
    let e = one_error(&[("farms/web.toml", &farm)]);
    assert_eq!(
        e,
        "farms/web.toml:8:8: farm `web`: path applies to http and https checks only"
    );
    let farm = web_with(
        "interval_ms = 2000\n",
        "kind = \"http\"\npath = \"health\"\nexpect_status = 99\ninterval_ms = 2000\n",
    );
    let d = dir(&[("farms/web.toml", &farm)]);
    assert_eq!(
        errors(d.path()),
        [
            "farms/web.toml:8:8: farm `web`: path `health` must start with '/'",
            "farms/web.toml:9:17: farm `web`: expect_status 99 is out of range (100-599)",
        ]
    );
}

#[test]
fn a_command_check_needs_an_absolute_command() {
    let farm = web_with(
        "interval_ms = 2000\n",
        "kind = \"command\"\ninterval_ms = 2000\n",
    );
    let e = one_error(&[("farms/web.toml", &farm)]);
    assert_eq!(
        e,
        "farms/web.toml:7:8: farm `web`: a command check needs `command`"
    );
    let farm = web_with(
        "interval_ms = 2000\n",
        "kind = \"command\"\ncommand = \"check.sh\"\ninterval_ms = 2000\n",
    );
    let e = one_error(&[("farms/web.toml", &farm)]);
    assert_eq!(
        e,
        "farms/web.toml:8:11: farm `web`: command `check.sh` must be an absolute path"
    );
}

#[test]
fn a_backend_of_the_other_family_or_weight_zero_is_refused() {
    let farm = web_with(
        "address = \"10.1.0.12\"\nport = 8080\n",
        "address = \"fd00::12\"\nweight = 0\n",
    );
    let d = dir(&[("farms/web.toml", &farm)]);
    assert_eq!(
        errors(d.path()),
        [
            "farms/web.toml:15:11: farm `web`: backend fd00::12 and vip 10.0.0.100 are of different families",
            "farms/web.toml:16:10: farm `web`: backend [fd00::12]:80 weight 0 is out of range (1-10000)",
        ]
    );
}

// ---- cluster ----

#[test]
fn failback_to_an_unknown_node_lists_the_nodes() {
    let e = one_error(&[(
        "cluster.toml",
        &cluster_with("failback = \"none\"", "failback = \"lb3\""),
    )]);
    assert_eq!(
        e,
        "cluster.toml:2:12: cluster: failback names node `lb3`, which is not one of the nodes (lb1, lb2); use \"none\" or a node name"
    );
}

#[test]
fn a_cluster_has_exactly_two_distinct_nodes() {
    let three = format!(
        "{}\n[[nodes]]\nname = \"lb3\"\naddress = \"192.168.100.3\"\n",
        common::CLUSTER
    );
    let e = one_error(&[("cluster.toml", &three)]);
    assert_eq!(
        e,
        "cluster.toml:7:1: cluster: a Tandem cluster has exactly 2 nodes, this one lists 3"
    );
    let twice = cluster_with("address = \"192.168.100.2\"", "address = \"192.168.100.1\"");
    let e = one_error(&[("cluster.toml", &twice)]);
    assert_eq!(
        e,
        "cluster.toml:13:11: cluster: address 192.168.100.1 is given to nodes 1 and 2"
    );
    let e = one_error(&[(
        "cluster.toml",
        &cluster_with("address = \"192.168.100.2\"", "address = \"127.0.0.2\""),
    )]);
    assert_eq!(
        e,
        "cluster.toml:13:11: cluster: node `lb2` address 127.0.0.2 is not a usable unicast address"
    );
}

#[test]
fn interface_names_follow_the_kernels_rules() {
    let c = cluster_with("interface = \"eth2\"", "interface = \"eth2:1\"");
    let c = c.replacen(
        "failback = \"none\"\n",
        "failback = \"none\"\ntracked_interfaces = [\"eth0\", \"a-very-long-name0\", \"eth0\"]\n",
        1,
    );
    let d = dir(&[("cluster.toml", &c)]);
    assert_eq!(
        errors(d.path()),
        [
            "cluster.toml:3:31: `a-very-long-name0` is not a valid interface name (1-15 characters, no '/', ':' or spaces)",
            "cluster.toml:3:52: cluster: tracked interface `eth0` appears twice",
            "cluster.toml:22:13: `eth2:1` is not a valid interface name (1-15 characters, no '/', ':' or spaces)",
        ]
    );
}

#[test]
fn a_floating_ip_needs_a_valid_prefix() {
    let e = one_error(&[(
        "cluster.toml",
        &cluster_with("address = \"10.1.0.100/24\"", "address = \"10.1.0.100/33\""),
    )]);
    assert_eq!(e, "cluster.toml:20:11: prefix length `33` must be 0-32");
}

// ---- node, and node against cluster ----

#[test]
fn a_clustered_node_must_be_one_of_the_nodes() {
    let e = one_error(&[("node.toml", &NODE.replace("lb1", "lb9"))]);
    assert_eq!(
        e,
        "cluster.toml:7:1: this node, `lb9` (node.toml), is not one of the cluster's nodes (lb1, lb2)"
    );
    let e = one_error(&[("node.toml", &NODE.replace("192.168.100.1", "192.168.100.7"))]);
    assert_eq!(
        e,
        "node.toml:3:19: cluster_address 192.168.100.7 differs from the address cluster.toml gives node `lb1`: 192.168.100.1"
    );
}

#[test]
fn a_clustered_node_needs_its_cluster_link() {
    let d = dir(&[("node.toml", "name = \"lb1\"\n")]);
    assert_eq!(
        errors(d.path()),
        [
            "node.toml:1:1: clustered (cluster.toml exists) but cluster_interface is not set: which interface carries the cluster link?",
            "node.toml:1:1: clustered (cluster.toml exists) but cluster_address is not set; cluster.toml gives this node 192.168.100.1",
        ]
    );
}

#[test]
fn node_names_and_api_keys_are_checked() {
    let node = "name = \"LB1\"\n\n[[api_keys]]\nname = \"mon\"\nsha256 = \"ABC\"\n\n[[api_keys]]\nname = \"mon\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";
    let d = dir(&[("node.toml", node)]);
    std::fs::remove_file(d.path().join("cluster.toml")).expect("rm");
    assert_eq!(
        errors(d.path()),
        [
            "node.toml:1:8: node name `LB1` must be a hostname label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
            "node.toml:5:10: API key `mon`: sha256 must be 64 lowercase hex digits",
            "node.toml:8:8: API key `mon` appears twice",
        ]
    );
}

#[test]
fn control_api_keys_are_checked() {
    let node = "name = \"lb1\"\ncontrol_listen = \"0.0.0.0:0\"\ncontrol_tls_key = \"tls/key.pem\"\n\n[[api_keys]]\nname = \"ci\"\nrole = \"root\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";
    let d = dir(&[("node.toml", node)]);
    std::fs::remove_file(d.path().join("cluster.toml")).expect("rm");
    let e = errors(d.path());
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("node.toml:7:8: unknown variant `root`, expected `read` or `admin`"),
        "{e:?}"
    );
    let node = node.replace("\"root\"", "\"admin\"");
    let d = dir(&[("node.toml", &node)]);
    std::fs::remove_file(d.path().join("cluster.toml")).expect("rm");
    assert_eq!(
        errors(d.path()),
        [
            "node.toml:2:18: control_listen 0.0.0.0:0: give a port (1-65535), e.g. 0.0.0.0:9443",
            "node.toml:3:19: control_tls_key is set but control_tls_cert is not: give both (or neither, for a generated self-signed pair)",
        ]
    );
    // Control: a port, and both files (or neither), is valid; a key
    // without `role` reads only.
    let node = "name = \"lb1\"\ncontrol_listen = \"0.0.0.0:9443\"\n\n[[api_keys]]\nname = \"mon\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";
    let d = dir(&[("node.toml", node)]);
    std::fs::remove_file(d.path().join("cluster.toml")).expect("rm");
    let c = Config::load(d.path()).expect("valid");
    assert_eq!(c.node.api_keys[0].role, tandem_config::ApiRole::Read);
    assert_eq!(c.node.control_listen, Some("0.0.0.0:9443".parse().unwrap()));
}

// ---- nonsense that parses ----

#[test]
fn a_backend_that_is_the_balancer_itself_is_refused() {
    // The farm's own VIP and SNAT address.
    let farm = web_with("address = \"10.1.0.11\"", "address = \"10.0.0.100\"").replacen(
        "address = \"10.1.0.12\"",
        "address = \"10.1.0.100\"",
        1,
    );
    let d = dir(&[("farms/web.toml", &farm)]);
    assert_eq!(
        errors(d.path()),
        [
            "farms/web.toml:11:11: farm `web`: backend 10.0.0.100 is the farm's own VIP: the balancer would forward to itself",
            "farms/web.toml:15:11: farm `web`: backend 10.1.0.100 is the farm's SNAT address: the balancer would forward to itself",
        ]
    );
    // A cluster node's address.
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("address = \"10.1.0.11\"", "address = \"192.168.100.2\""),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:11:11: farm `web`: backend 192.168.100.2 is the cluster address of node `lb2`: the balancer would forward to itself"
    );
    // Another farm's VIP, and on a standalone node this node's own cluster
    // address.
    let api = "name = \"api\"\nvip = \"10.0.0.100\"\nport = 81\nsnat_address = \"10.1.0.100\"\n\n[[backends]]\naddress = \"10.1.0.11\"\n";
    let cluster = cluster_with(
        "[[floating_ips]]\naddress = \"10.0.0.100/24\"",
        "[[floating_ips]]\naddress = \"10.0.0.101/24\"\ninterface = \"eth0\"\n\n[[floating_ips]]\naddress = \"10.0.0.100/24\"",
    );
    let e = one_error(&[
        ("cluster.toml", &cluster),
        (
            "farms/api.toml",
            &api.replace("vip = \"10.0.0.100\"", "vip = \"10.0.0.101\""),
        ),
        (
            "farms/web.toml",
            &web_with("address = \"10.1.0.11\"", "address = \"10.0.0.101\""),
        ),
    ]);
    assert!(
        e.starts_with(
            "farms/web.toml:11:11: farm `web`: backend 10.0.0.101 is the VIP of farm `api` ("
        ),
        "{e}"
    );
    let standalone = common::write(&[
        ("node.toml", NODE),
        (
            "farms/web.toml",
            &web_with("address = \"10.1.0.11\"", "address = \"192.168.100.1\""),
        ),
    ]);
    assert_eq!(
        errors(standalone.path()),
        [
            "farms/web.toml:11:11: farm `web`: backend 192.168.100.1 is this node's cluster address (node `lb1`): the balancer would forward to itself"
        ]
    );
    // Control: a real server is accepted.
    let ok = dir(&[(
        "farms/web.toml",
        &web_with("address = \"10.1.0.11\"", "address = \"10.1.0.13\""),
    )]);
    Config::load(ok.path()).expect("a backend on the backends' network is valid");
}

#[test]
fn a_floating_ip_with_prefix_zero_is_refused() {
    let e = one_error(&[(
        "cluster.toml",
        &cluster_with("address = \"10.1.0.100/24\"", "address = \"10.1.0.100/0\""),
    )]);
    assert_eq!(
        e,
        "cluster.toml:20:11: cluster: floating IP 10.1.0.100/0 has prefix length 0: the master would route every address to eth2 through it; give the prefix of the interface's subnet (e.g. 10.1.0.100/24)"
    );
    // Control: /32 (a host address) is fine.
    let ok = dir(&[(
        "cluster.toml",
        &cluster_with("address = \"10.1.0.100/24\"", "address = \"10.1.0.100/32\""),
    )]);
    Config::load(ok.path()).expect("/32 is valid");
}

#[test]
fn a_key_file_outside_the_configuration_directory_is_refused() {
    for (path, why) in [
        ("/etc/shadow", "is an absolute path"),
        (
            "../../../etc/shadow",
            "climbs out of the configuration directory with `..`",
        ),
        (
            "keys/../../x",
            "climbs out of the configuration directory with `..`",
        ),
    ] {
        let c = format!("{}\n[sync]\nkey_file = \"{path}\"\n", common::CLUSTER);
        let e = one_error(&[("cluster.toml", &c)]);
        assert_eq!(
            e,
            format!(
                "cluster.toml:24:12: cluster: key_file `{path}` {why}: the key must be a file inside the configuration directory, e.g. \"keys/sync.key\" (cluster.toml is replicated: a path outside would make the peer read any file of its own as the key)"
            )
        );
    }
    // Control: inside the directory.
    for path in ["keys/sync.key", "./sync.key", "keys/..sync"] {
        let c = format!("{}\n[sync]\nkey_file = \"{path}\"\n", common::CLUSTER);
        let ok = dir(&[("cluster.toml", &c)]);
        Config::load(ok.path()).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

#[test]
fn a_health_command_that_can_never_run_is_refused() {
    let with = |command: &str| {
        web_with(
            "interval_ms = 2000\n",
            &format!("kind = \"command\"\ncommand = '{command}'\ninterval_ms = 2000\n"),
        )
    };
    for (command, why) in [
        (
            "/usr/lib/check --port 80",
            "contains a space: it is run as one path, without a shell, with the backend's address and port as its arguments; put the command line in a script and give the script's path",
        ),
        (
            "/bin/check|logger",
            "contains the shell character `|`: it is run as one path, without a shell; put the command line in a script and give the script's path",
        ),
        (
            "/usr/lib/$CHECK",
            "contains the shell character `$`: it is run as one path, without a shell; put the command line in a script and give the script's path",
        ),
        (
            "/etc/tandem/checks/",
            "names a directory (it ends with '/'), not a program",
        ),
    ] {
        let e = one_error(&[("farms/web.toml", &with(command))]);
        assert_eq!(
            e,
            format!("farms/web.toml:8:11: farm `web`: command `{command}` can never run: it {why}")
        );
    }
    let tab = web_with(
        "interval_ms = 2000\n",
        "kind = \"command\"\ncommand = \"/bin/check\\tx\"\ninterval_ms = 2000\n",
    );
    let e = one_error(&[("farms/web.toml", &tab)]);
    assert!(e.contains("contains the character '\\t'"), "{e}");
    // Control: a plain path runs.
    let ok = dir(&[("farms/web.toml", &with("/etc/tandem/checks/web-check.sh"))]);
    Config::load(ok.path()).expect("a plain absolute path is valid");
}
