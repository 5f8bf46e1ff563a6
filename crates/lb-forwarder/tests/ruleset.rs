//! The datapath as a pure function, and the script it renders applied to a
//! real kernel inside a lab namespace.

use std::collections::HashMap;

use lb_forwarder::ruleset::{
    BackendKey, Count, Inputs, SH_BUCKETS, backend_in_counter, plan, render, sh_owners,
};
use lb_forwarder::sched::Load;
use tandem_config::{BackendState, Farm};

fn farm(text: &str) -> Farm {
    toml::from_str(text).expect("farm")
}

const WEB: &str = r#"
name = "web"
vip = "10.0.0.100"
port = 80
scheduler = "wrr"
snat_address = "10.1.0.100"
[[backends]]
address = "10.1.0.11"
port = 8080
weight = 3
[[backends]]
address = "10.1.0.12"
port = 8080
weight = 2
[[backends]]
address = "10.1.0.13"
port = 8080
weight = 1
state = "drain"
"#;

fn key(farm: &str, addr: &str, port: Option<u16>) -> BackendKey {
    BackendKey {
        farm: farm.into(),
        address: addr.parse().expect("addr"),
        port,
    }
}

#[test]
fn wrr_spreads_by_weight_over_backends_in_rotation() {
    let web = farm(WEB);
    let (script, plans) = render(std::slice::from_ref(&web), &Inputs::default());
    let (b1, b2, b3) = (
        key("web", "10.1.0.11", Some(8080)).mark(),
        key("web", "10.1.0.12", Some(8080)).mark(),
        key("web", "10.1.0.13", Some(8080)).mark(),
    );
    let shares: Vec<u64> = plans[0].rotation.iter().map(|(_, w)| *w).collect();
    assert_eq!(
        shares,
        [3, 2],
        "the draining backend takes no new connections"
    );
    // Interleaved (smooth weighted round robin), not in blocks.
    let marks = format!(
        "ct mark set numgen inc mod 5 map {{ 0 : {b1:#x}, 1 : {b2:#x}, 2 : {b1:#x}, 3 : {b2:#x}, 4 : {b1:#x} }}"
    );
    assert!(script.contains(&marks), "{marks}\n{script}");
    assert!(
        script.contains("ct mark @ported_web meta l4proto tcp dnat ip to ct mark map @dnat_web"),
        "{script}"
    );
    // DNAT targets, in mark order.
    let dnat = script
        .lines()
        .skip_while(|l| !l.contains("map dnat_web"))
        .nth(2)
        .expect("dnat_web elements");
    for t in [
        format!("{b1:#x} : 10.1.0.11 . 8080"),
        format!("{b2:#x} : 10.1.0.12 . 8080"),
        format!("{b3:#x} : 10.1.0.13 . 8080"),
    ] {
        assert!(dnat.contains(&t), "{t}\n{script}");
    }
    assert!(
        script.contains("ip daddr 10.0.0.100 meta l4proto tcp th dport 80 jump farm_web"),
        "{script}"
    );
    assert!(
        script.contains("ct status dnat meta l4proto tcp ct original ip daddr 10.0.0.100 ct original proto-dst 80 snat ip to 10.1.0.100"),
        "SNAT to the floating address: {script}"
    );
    // The draining backend keeps counting its established connections,
    // each way.
    assert!(
        script.contains(&format!("{b3:#x} . original : in_web_10_1_0_13_8080"))
            && script.contains(&format!("{b3:#x} . reply : out_web_10_1_0_13_8080")),
        "{script}"
    );
}

#[test]
fn a_failing_or_overridden_backend_leaves_the_rotation_and_an_empty_farm_drops() {
    let web = farm(WEB);
    let mut inputs = Inputs::default();
    inputs.failing.insert(key("web", "10.1.0.11", Some(8080)));
    let p = plan(&web, &inputs);
    assert_eq!(p.rotation, vec![(key("web", "10.1.0.12", Some(8080)), 2)]);
    inputs.overrides.insert(
        key("web", "10.1.0.12", Some(8080)),
        BackendState::Maintenance,
    );
    let (script, plans) = render(std::slice::from_ref(&web), &inputs);
    assert!(plans[0].rotation.is_empty());
    assert!(
        script.contains("drop comment \"every backend is out of rotation\""),
        "{script}"
    );
}

#[test]
fn source_hash_moves_only_the_sources_of_a_backend_that_leaves() {
    let sh = farm(
        &WEB.replace("scheduler = \"wrr\"", "scheduler = \"sh\"")
            .replace("state = \"drain\"", ""),
    );
    let before = sh_owners(&sh, &Inputs::default());
    assert_eq!(before.len(), SH_BUCKETS as usize);
    let mut inputs = Inputs::default();
    let gone = key("web", "10.1.0.12", Some(8080));
    inputs.failing.insert(gone.clone());
    let after = sh_owners(&sh, &inputs);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(*a, gone);
        if *b != gone {
            assert_eq!(a, b, "a bucket of a backend still in rotation moved");
        } else {
            moved += 1;
        }
    }
    assert!(
        (300..=400).contains(&moved),
        "about a third of the buckets move: {moved}"
    );
    let (script, _) = render(
        std::slice::from_ref(&sh),
        &Inputs {
            hash_seed: 0x5eed1234,
            ..Inputs::default()
        },
    );
    let first = key("web", "10.1.0.11", Some(8080)).mark();
    let want =
        format!("ct mark set jhash ip saddr mod 1024 seed 0x5eed1234 map {{ 0-341 : {first:#x}");
    assert!(script.contains(&want), "{want}\n{script}");
}

#[test]
fn least_connections_fills_the_idle_backends_first() {
    let lc = farm(
        &WEB.replace("scheduler = \"wrr\"", "scheduler = \"lc\"")
            .replace("state = \"drain\"", ""),
    );
    let mut inputs = Inputs::default();
    inputs.loads.insert(
        key("web", "10.1.0.11", Some(8080)),
        Load {
            active: 19,
            inactive: 0,
        },
    );
    let p = plan(&lc, &inputs);
    let w: HashMap<String, u64> = p
        .rotation
        .iter()
        .map(|(k, w)| (k.address.to_string(), *w))
        .collect();
    // The next 1,024 connections: 19 each to b2 and b3 to catch up with
    // b1, then the three in turn (ties to the first listed): 986 = 3 × 328
    // + 2.
    assert_eq!(
        (w["10.1.0.11"], w["10.1.0.12"], w["10.1.0.13"]),
        (329, 19 + 329, 19 + 328),
        "{w:?}"
    );
    assert!(!p.finite, "no threshold: the schedule repeats");
}

#[test]
fn schedules_interleave_and_stay_bounded() {
    let k = |i: u8| key("web", &format!("10.1.0.{i}"), Some(8080));
    let order = lb_forwarder::ruleset::schedule(&[(k(1), 50), (k(2), 1000), (k(3), 1000)]);
    assert_eq!(order.len(), 2050);
    // Any 20 consecutive slots follow the weights, not one backend's block.
    let window = &order[..20];
    assert!(
        window.iter().filter(|x| **x == k(1)).count() <= 1,
        "{window:?}"
    );
    let big = lb_forwarder::ruleset::schedule(&[(k(1), 10_000), (k(2), 10_000), (k(3), 1)]);
    assert!(big.len() as u64 <= lb_forwarder::ruleset::MAX_SLOTS + 3);
    assert!(big.contains(&k(3)), "a small weight keeps a slot");
}

fn dsr(text: &str) -> Farm {
    farm(
        &text
            .replace("snat_address = \"10.1.0.100\"", "forwarding = \"dsr\"")
            .replace("port = 8080\n", ""),
    )
}

#[test]
fn direct_server_return_hashes_untracked_packets_to_the_backend_unchanged() {
    let web = dsr(WEB);
    let (script, plans) = render(
        std::slice::from_ref(&web),
        &Inputs {
            hash_seed: 0x5eed,
            ..Inputs::default()
        },
    );
    // Its own table: nft has no `dup` in inet tables.
    assert!(script.contains("table ip tandem_dsr {"), "{script}");
    assert!(
        script.contains("ip daddr 10.0.0.100 meta l4proto tcp th dport 80 notrack"),
        "{script}"
    );
    assert!(
        script.contains("meta mark set jhash ip saddr . th sport mod 1024 seed 0x5eed map"),
        "{script}"
    );
    assert!(script.contains("dup to meta mark map @dsr_web"), "{script}");
    assert!(!script.contains("dnat"), "no address is translated");
    // wrr: buckets in proportion to the weights (3:2), the draining
    // backend's buckets dealt to the others.
    let shares: Vec<u64> = plans[0].rotation.iter().map(|(_, w)| *w).collect();
    assert_eq!(shares.iter().sum::<u64>(), u64::from(SH_BUCKETS));
    let ratio = shares[0] as f64 / shares[1] as f64;
    assert!((1.3..1.7).contains(&ratio), "{shares:?}");
}

#[test]
fn direct_server_return_moves_only_the_flows_of_a_backend_that_leaves() {
    let web = dsr(&WEB.replace("state = \"drain\"", ""));
    let before = lb_forwarder::ruleset::dsr_owners(&web, &Inputs::default());
    let mut inputs = Inputs::default();
    inputs.failing.insert(key("web", "10.1.0.12", None));
    let after = lb_forwarder::ruleset::dsr_owners(&web, &inputs);
    let gone = key("web", "10.1.0.12", None);
    for (b, a) in before.iter().zip(&after) {
        if *b != gone {
            assert_eq!(b, a, "a bucket of a backend still up kept its owner");
        } else {
            assert_ne!(*a, gone);
        }
    }
    // An empty rotation drops rather than sending anywhere.
    for k in ["10.1.0.11", "10.1.0.13"] {
        inputs.failing.insert(key("web", k, None));
    }
    let (script, _) = render(std::slice::from_ref(&web), &inputs);
    assert!(
        script.contains("every backend is out of rotation"),
        "{script}"
    );
}

#[test]
fn ipv6_and_port_ranges_render() {
    let v6 = farm(
        r#"
name = "v6"
vip = "fd00::100"
port = "30000-30100"
protocol = "both"
snat_address = "fd01::100"
[health_check]
kind = "none"
[[backends]]
address = "fd01::11"
"#,
    );
    let (script, _) = render(std::slice::from_ref(&v6), &Inputs::default());
    assert!(
        script.contains(
            "ip6 daddr fd00::100 meta l4proto { tcp, udp } th dport 30000-30100 jump farm_v6"
        ),
        "{script}"
    );
    let m = key("v6", "fd01::11", None).mark();
    assert!(
        script.contains("dnat ip6 to ct mark map @keep_v6")
            && script.contains(&format!(
                "type mark : ipv6_addr\n    elements = {{ {m:#x} : fd01::11 }}"
            )),
        "keeps the client's port: {script}"
    );
    assert!(script.contains("snat ip6 to fd01::100"), "{script}");
}

#[test]
fn marks_are_stable_and_counters_carry_over() {
    let k = key("web", "10.1.0.11", Some(8080));
    assert_eq!(k.mark(), key("web", "10.1.0.11", Some(8080)).mark());
    assert_ne!(k.mark(), key("web", "10.1.0.12", Some(8080)).mark());
    assert_ne!(k.mark(), 0);
    let web = farm(WEB);
    let mut inputs = Inputs::default();
    inputs.counters.insert(
        backend_in_counter(&k),
        Count {
            packets: 7,
            bytes: 700,
        },
    );
    let (script, _) = render(std::slice::from_ref(&web), &inputs);
    assert!(
        script.contains("counter in_web_10_1_0_11_8080 {\n    packets 7 bytes 700\n  }"),
        "{script}"
    );
    assert_eq!(
        render(std::slice::from_ref(&web), &inputs).0,
        script,
        "deterministic"
    );
}

/// The rendered script is accepted by the real nft, twice in a row (atomic
/// replace), inside a lab namespace; a broken script changes nothing.
#[test]
fn the_kernel_accepts_the_script_and_refuses_a_broken_one_without_change() {
    let lab = tandem_lab::Lab::new().expect("lab");
    let ns = lab.netns("fw").expect("netns");
    let sh = farm(&WEB.replace("scheduler = \"wrr\"", "scheduler = \"sh\""));
    let v6 = farm(
        "name = \"v6\"\nvip = \"fd00::100\"\nport = 443\nsnat_address = \"fd01::100\"\n[[backends]]\naddress = \"fd01::11\"\n",
    );
    let dsr4 = farm(
        "name = \"d4\"\nvip = \"10.0.0.101\"\nport = 80\nforwarding = \"dsr\"\nscheduler = \"sh\"\n[[backends]]\naddress = \"10.1.0.11\"\n",
    );
    let dsr6 = farm(
        "name = \"d6\"\nvip = \"fd00::101\"\nport = 80\nprotocol = \"both\"\nforwarding = \"dsr\"\n[[backends]]\naddress = \"fd01::11\"\n",
    );
    let (script, _) = render(
        &[sh, v6, dsr4, dsr6],
        &Inputs {
            hash_seed: 7,
            ..Inputs::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let result = ns
        .run(|| {
            rt.block_on(async {
                lb_forwarder::nft::apply(&script).await?;
                lb_forwarder::nft::apply(&script).await?;
                let counters = lb_forwarder::nft::read_counters().await?;
                let broken = lb_forwarder::nft::apply(
                    "table inet tandem {\n  chain x {\n    nonsense\n  }\n}\n",
                )
                .await;
                let after = lb_forwarder::nft::read_counters().await?;
                Ok::<_, lb_forwarder::nft::NftError>((counters, broken, after))
            })
        })
        .expect("ns thread");
    let (counters, broken, after) = result.expect("nft");
    assert!(
        counters.contains_key("in_web_10_1_0_11_8080")
            && counters.contains_key("out_v6_fd01__11")
            && counters.contains_key("in_d4_10_1_0_11")
            && counters.contains_key("in_d6_fd01__11"),
        "{counters:?}"
    );
    assert!(
        matches!(broken, Err(lb_forwarder::nft::NftError::Refused(_))),
        "{broken:?}"
    );
    assert_eq!(
        counters.len(),
        after.len(),
        "the refused script changed nothing"
    );
}

/// A change of rotation alone keeps the table's structure: only the farm
/// chain is rewritten, in the kernel, and the counters are kept.
#[test]
fn a_rotation_change_rewrites_only_the_farm_chain_and_keeps_counters() {
    use lb_forwarder::ruleset::render_parts;
    let web = farm(WEB);
    let dns = farm(
        &WEB.replace("name = \"web\"", "name = \"dns\"")
            .replace("port = 80\n", "port = 53\nprotocol = \"udp\"\n"),
    );
    let farms = [dns, web];
    let before = render_parts(&farms, &Inputs::default());
    let mut inputs = Inputs::default();
    inputs.failing.insert(key("web", "10.1.0.11", Some(8080)));
    let after = render_parts(&farms, &inputs);
    assert_eq!(
        before.structure, after.structure,
        "health does not change the structure"
    );
    let update = after.update_from(&before);
    assert!(
        update.starts_with("flush chain inet tandem farm_web\n"),
        "{update}"
    );
    assert!(
        !update.contains("farm_dns"),
        "an unchanged farm is not touched: {update}"
    );
    assert!(after.update_from(&after).is_empty());

    let lab = tandem_lab::Lab::new().expect("lab");
    let ns = lab.netns("fw").expect("netns");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let mut seeded = Inputs::default();
    seeded.counters.insert(
        "in_web_10_1_0_12_8080".into(),
        Count {
            packets: 5,
            bytes: 500,
        },
    );
    let full = render_parts(&farms, &seeded).full(&seeded.counters);
    let result = ns
        .run(|| {
            rt.block_on(async {
                lb_forwarder::nft::apply(&full).await?;
                lb_forwarder::nft::apply(&update).await?;
                lb_forwarder::nft::read_counters().await
            })
        })
        .expect("ns thread")
        .expect("nft");
    assert_eq!(
        result["in_web_10_1_0_12_8080"],
        Count {
            packets: 5,
            bytes: 500
        },
        "counters survive a fast update"
    );
    let chain = ns
        .exec("nft", &["list", "chain", "inet", "tandem", "farm_web"])
        .expect("list");
    let text = String::from_utf8_lossy(&chain.stdout);
    let gone = key("web", "10.1.0.11", Some(8080)).mark();
    assert!(
        !text.contains(&format!("{gone:#010x}")),
        "the failing backend left the scheduler map:\n{text}"
    );
}

/// A configuration change that only adds or removes backends (a farm file
/// edited) is applied in place too: their map elements and counters come
/// and go, the other backends keep their counters, and the kernel ends up
/// with exactly the table a full replacement would give.
#[test]
fn backends_added_or_removed_are_updated_in_place() {
    use lb_forwarder::ruleset::render_parts;
    let before_farm = farm(WEB);
    let after_farm = farm(&WEB.replace(
        "[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\nweight = 3\n",
        "[[backends]]\naddress = \"10.1.0.14\"\nweight = 3\n",
    ));
    let before = render_parts(std::slice::from_ref(&before_farm), &Inputs::default());
    let after = render_parts(std::slice::from_ref(&after_farm), &Inputs::default());
    assert_ne!(before.structure, after.structure);
    assert!(after.structure.updatable_from(&before.structure));
    let moved = farm(&WEB.replace("port = 80\n", "port = 81\n"));
    let other_port = render_parts(std::slice::from_ref(&moved), &Inputs::default());
    assert!(
        !other_port.structure.updatable_from(&before.structure),
        "a farm that moved to another port needs the table replaced"
    );
    let update = after.update_from(&before);
    assert!(
        update.contains("delete counter inet tandem in_web_10_1_0_11_8080"),
        "{update}"
    );
    assert!(
        update.contains("add counter inet tandem in_web_10_1_0_14"),
        "{update}"
    );
    assert!(
        !update.contains("10_1_0_12"),
        "a backend that stays is not touched: {update}"
    );

    let lab = tandem_lab::Lab::new().expect("lab");
    let ns = lab.netns("fw").expect("netns");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let mut seeded = HashMap::new();
    seeded.insert(
        "in_web_10_1_0_12_8080".to_owned(),
        Count {
            packets: 7,
            bytes: 700,
        },
    );
    let list = |ns: &tandem_lab::Netns| {
        let out = ns
            .exec("nft", &["list", "table", "inet", "tandem"])
            .expect("list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let counters = ns
        .run(|| {
            rt.block_on(async {
                lb_forwarder::nft::apply(&before.full(&seeded)).await?;
                lb_forwarder::nft::apply(&update).await?;
                lb_forwarder::nft::read_counters().await
            })
        })
        .expect("ns thread")
        .expect("nft");
    let updated = list(&ns);
    assert_eq!(
        counters["in_web_10_1_0_12_8080"],
        Count {
            packets: 7,
            bytes: 700
        },
        "a backend that stays keeps its counter"
    );
    assert!(counters.contains_key("in_web_10_1_0_14"));
    assert!(!counters.contains_key("in_web_10_1_0_11_8080"));
    // The same as a table built from scratch (counter values aside).
    let fresh = ns
        .run(|| rt.block_on(lb_forwarder::nft::apply(&after.full(&counters))))
        .expect("ns thread");
    fresh.expect("full apply");
    let replaced = list(&ns);
    let norm = |t: &str| {
        let mut l: Vec<String> = t
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("packets"))
            .map(str::to_owned)
            .collect();
        l.sort();
        l
    };
    assert_eq!(norm(&updated), norm(&replaced));
}

const FULL: &str = r#"
name = "full"
vip = "10.0.0.100"
port = 80
scheduler = "wlc"
snat_address = "10.1.0.100"
persistence_timeout_s = 300
persistence_netmask = "255.255.255.0"
on_backend_failure = "reset"
[sorry_server]
address = "10.1.0.99"
port = 8080
[timeouts]
tcp_s = 900
tcp_fin_s = 30
[[backends]]
address = "10.1.0.11"
port = 8080
weight = 2
upper_threshold = 100
lower_threshold = 50
[[backends]]
address = "10.1.0.12"
port = 8080
"#;

const DNS: &str = r#"
name = "dns"
vip = "10.0.0.100"
port = 53
protocol = "udp"
scheduler = "mh"
hash_source_port = true
one_packet = true
snat_address = "10.1.0.100"
[health_check]
kind = "none"
[timeouts]
udp_s = 5
[[backends]]
address = "10.1.0.11"
[[backends]]
address = "10.1.0.12"
"#;

const MARKED: &str = r#"
name = "marked"
vip = "10.0.0.100"
port = "80-443"
fwmark = 7
scheduler = "dh"
snat_address = "10.1.0.100"
[[backends]]
address = "10.1.0.21"
[[backends]]
address = "10.1.0.22"
"#;

#[test]
fn persistence_timeouts_and_the_sorry_server_render() {
    let full = farm(FULL);
    let (script, plans) = render(std::slice::from_ref(&full), &Inputs::default());
    let b1 = key("full", "10.1.0.11", Some(8080)).mark();
    let b2 = key("full", "10.1.0.12", Some(8080)).mark();
    let sorry = key("full", "10.1.0.99", Some(8080)).mark();
    for want in [
        // The kernel's timeouts for the farm's connections, set as each
        // one is created.
        "ct timeout timeouts_full_tcp {\n    protocol tcp; l3proto ip;\n    policy = { established : 900, fin_wait : 30, close_wait : 30, last_ack : 30, time_wait : 30 }",
        "meta l4proto tcp ct timeout set \"timeouts_full_tcp\"",
        // The persistence map: the masked client → its backend.
        "map persist_full {\n    type ipv4_addr : mark\n    size 262144\n    flags dynamic,timeout\n    timeout 300s",
        "update @persist_full { ip saddr and 255.255.255.0 : ct mark }",
    ] {
        assert!(script.contains(want), "{want}\n{script}");
    }
    // A persistent client keeps its backend only while it is in rotation.
    let lookup = format!(
        "ct mark set ip saddr and 255.255.255.0 map @persist_full ct mark {{ {b1:#x}, {b2:#x} }} goto persist_full"
    );
    let lookup_other_order = format!(
        "ct mark set ip saddr and 255.255.255.0 map @persist_full ct mark {{ {b2:#x}, {b1:#x} }} goto persist_full"
    );
    assert!(
        script.contains(&lookup) || script.contains(&lookup_other_order),
        "{script}"
    );
    // The sorry server: last, after the scheduler, and counted like a backend.
    assert!(
        script.contains(&format!(
            "ct mark set {sorry:#x} goto nat_full comment \"sorry server"
        )),
        "{script}"
    );
    assert!(
        script.contains(&format!("{sorry:#x} : 10.1.0.99 . 8080")),
        "{script}"
    );
    assert!(plans[0].sorry.is_none(), "backends are in rotation");

    // Every backend out: the sorry server takes the new connections.
    let mut inputs = Inputs::default();
    for b in ["10.1.0.11", "10.1.0.12"] {
        inputs.failing.insert(key("full", b, Some(8080)));
    }
    let p = plan(&full, &inputs);
    assert!(p.rotation.is_empty());
    assert_eq!(p.sorry, Some(key("full", "10.1.0.99", Some(8080))));
    let (script, _) = render(std::slice::from_ref(&full), &inputs);
    assert!(
        !script.contains("map @persist_full ct mark"),
        "no persistent client is sent to a backend out of rotation: {script}"
    );
}

#[test]
fn thresholds_end_the_schedule_and_rewrite_it_at_each_refresh() {
    let full = farm(FULL);
    let b1 = key("full", "10.1.0.11", Some(8080));
    let b2 = key("full", "10.1.0.12", Some(8080));
    let mut inputs = Inputs::default();
    inputs.loads.insert(
        b1.clone(),
        Load {
            active: 97,
            inactive: 0,
        },
    );
    let p = plan(&full, &inputs);
    let shares: HashMap<_, _> = p.rotation.iter().cloned().collect();
    assert_eq!(shares[&b1], 3, "3 more to reach its threshold of 100");
    assert!(shares[&b2] > 900, "{shares:?}");
    assert!(!p.finite, "b2 has no threshold: the schedule repeats");
    // b1 over its threshold: out, until it is down to 50.
    inputs.overloaded.insert(b1.clone());
    let p = plan(&full, &inputs);
    assert_eq!(p.rotation, vec![(b2.clone(), 1024)]);
    // Both with thresholds and nearly full: a finite schedule, rewritten at
    // each refresh so its counter starts again from the new loads.
    let two = farm(&FULL.replace(
        "[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n",
        "[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\nupper_threshold = 5\n",
    ));
    inputs.overloaded.clear();
    inputs.refresh = 7;
    let p = plan(&two, &inputs);
    assert!(p.finite);
    assert_eq!(
        p.rotation.iter().map(|(_, n)| n).sum::<u64>(),
        3 + 5,
        "{:?}",
        p.rotation
    );
    let (script, _) = render(std::slice::from_ref(&two), &inputs);
    assert!(
        script.contains("ct mark set numgen inc mod 2147483648 map {"),
        "{script}"
    );
    assert!(script.contains("comment \"refresh 7\""), "{script}");
}

#[test]
fn one_packet_hashing_and_marks_render() {
    let dns = farm(DNS);
    let marked = farm(MARKED);
    let inputs = Inputs {
        hash_seed: 0x5eed,
        ..Inputs::default()
    };
    let (script, plans) = render(&[dns.clone(), marked.clone()], &inputs);
    for want in [
        // Each datagram its own conntrack zone, before conntrack sees it.
        "type filter hook prerouting priority raw; policy accept;\n    ip daddr 10.0.0.100 meta l4proto udp th dport 53 ct original zone set numgen inc mod 65535",
        "policy = { unreplied : 5, replied : 5 }",
        // Maglev over a prime-sized table, source address and port.
        "ct mark set jhash ip saddr . th sport mod 211 seed 0x5eed map {",
        // The mark set by the operator's own rules selects the farm; dh
        // hashes the destination.
        "meta nfproto ipv4 meta mark 0x7 meta l4proto tcp jump farm_marked",
        "ct mark set jhash ip daddr mod 1024 seed 0x5eed map {",
        "ct status dnat meta nfproto ipv4 ct mark @members_marked snat ip to 10.1.0.100",
    ] {
        assert!(script.contains(want), "{want}\n{script}");
    }
    let mh = &plans[0];
    assert_eq!(mh.rotation.iter().map(|(_, n)| n).sum::<u64>(), 211);
}

#[test]
fn fo_and_ovf_order_by_weight() {
    let fo = farm(&WEB.replace("scheduler = \"wrr\"", "scheduler = \"fo\""));
    let p = plan(&fo, &Inputs::default());
    assert_eq!(p.rotation, vec![(key("web", "10.1.0.11", Some(8080)), 1)]);
    let mut inputs = Inputs::default();
    inputs.failing.insert(key("web", "10.1.0.11", Some(8080)));
    let p = plan(&fo, &inputs);
    assert_eq!(
        p.rotation,
        vec![(key("web", "10.1.0.12", Some(8080)), 1)],
        "the next heaviest; the draining one never"
    );
    let ovf = farm(
        &WEB.replace("scheduler = \"wrr\"", "scheduler = \"ovf\"")
            .replace("state = \"drain\"", ""),
    );
    let p = plan(&ovf, &Inputs::default());
    assert!(p.finite, "3 + 2 + 1 connections, then none");
    let shares: Vec<u64> = p.rotation.iter().map(|(_, n)| *n).collect();
    assert_eq!(shares, [3, 2, 1]);
}

/// Every feature's script is accepted by the real kernel, twice (atomic
/// replace), and a persistence seed script applies on top.
#[test]
fn the_kernel_accepts_every_feature() {
    let lab = tandem_lab::Lab::new().expect("lab");
    let ns = lab.netns("fw").expect("netns");
    let dsr_of = |name: &str, sched: &str, vip: &str| {
        farm(&format!(
            "name = \"{name}\"\nvip = \"{vip}\"\nport = 80\nforwarding = \"dsr\"\nscheduler = \"{sched}\"\n[[backends]]\naddress = \"10.1.0.11\"\nweight = 2\n[[backends]]\naddress = \"10.1.0.12\"\n"
        ))
    };
    let farms = [
        farm(FULL),
        farm(DNS),
        farm(MARKED),
        dsr_of("dmh", "mh", "10.0.0.101"),
        dsr_of("ddh", "dh", "10.0.0.102"),
        dsr_of("dfo", "fo", "10.0.0.103"),
        farm(
            "name = \"v6\"\nvip = \"fd00::100\"\nport = 443\nprotocol = \"both\"\nscheduler = \"sed\"\nsnat_address = \"fd01::100\"\npersistence_timeout_s = 60\npersistence_netmask = \"/64\"\n[sorry_server]\naddress = \"fd01::99\"\n[timeouts]\ntcp_s = 60\nudp_s = 9\n[[backends]]\naddress = \"fd01::11\"\nupper_threshold = 9\n",
        ),
    ];
    let mut inputs = Inputs {
        hash_seed: 7,
        orphan_grace_ms: 1000,
        ..Inputs::default()
    };
    inputs.loads.insert(
        key("full", "10.1.0.11", Some(8080)),
        Load {
            active: 99,
            inactive: 1,
        },
    );
    let (script, _) = render(&farms, &inputs);
    let seeds = lb_forwarder::ruleset::persistence_seed_script(
        &farms[0],
        &[(
            "10.0.0.0".parse().expect("ip"),
            key("full", "10.1.0.12", Some(8080)).mark(),
        )],
        300,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let counters = ns
        .run(|| {
            rt.block_on(async {
                lb_forwarder::nft::apply(&script).await?;
                lb_forwarder::nft::apply(&script).await?;
                lb_forwarder::nft::apply(&seeds).await?;
                lb_forwarder::nft::read_counters().await
            })
        })
        .expect("ns thread")
        .unwrap_or_else(|e| panic!("{e}\n{script}"));
    assert!(
        counters.contains_key("in_full_10_1_0_99_8080"),
        "{counters:?}"
    );
    assert!(counters.contains_key("conn_dns_10_1_0_11"), "{counters:?}");
    assert!(counters.contains_key("in_dmh_10_1_0_11"), "{counters:?}");
    let dsr = ns
        .exec("nft", &["list", "table", "ip", "tandem_dsr"])
        .expect("list dsr");
    let dsr = String::from_utf8_lossy(&dsr.stdout);
    assert!(dsr.contains("jhash ip saddr mod 211 seed 0x7"), "{dsr}");
    assert!(dsr.contains("jhash ip daddr mod 1024 seed 0x7"), "{dsr}");
    let map = ns
        .exec("nft", &["list", "map", "inet", "tandem", "persist_full"])
        .expect("list");
    let text = String::from_utf8_lossy(&map.stdout);
    assert!(text.contains("10.0.0.0 expires"), "{text}");
    let orphans = ns
        .exec("nft", &["list", "chain", "inet", "tandem", "orphans"])
        .expect("list orphans");
    let text = String::from_utf8_lossy(&orphans.stdout);
    assert!(text.contains("@orphan_vips_ip goto orphan_ip"), "{text}");
    assert!(text.contains("@orphan_snat_ip6 goto orphan_ip6"), "{text}");
}

/// A counter dump as the kernel (6.18) answered it in a lab namespace
/// holding `table inet tandem { counter in_web_10_1_0_11_8080 { packets 7
/// bytes 700 } }`: one NFT_MSG_NEWOBJ (NLM_F_MULTI | NLM_F_DUMP_FILTERED),
/// then NLMSG_DONE.
const KERNEL_COUNTER_DUMP: &str = "74000000120a020801000000724e0000010000020b00010074616e64656d00001a000200696e5f7765625f31305f315f305f31315f3830383000000008000300000000010c000600000000000000000108000500000000001c0004000c00010000000000000002bc0c0002000000000000000007140000000300020001000000724e000000000000";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn the_kernels_counter_dump_parses() {
    use lb_forwarder::nftnl::{CounterObject, parse_dump};
    let part = parse_dump(&unhex(KERNEL_COUNTER_DUMP)).expect("parse");
    assert!(part.done && !part.interrupted);
    assert_eq!(
        part.counters,
        [CounterObject {
            table: "tandem".into(),
            name: "in_web_10_1_0_11_8080".into(),
            count: Count {
                packets: 7,
                bytes: 700
            },
        }]
    );
    // The same message flagged NLM_F_DUMP_INTR: read again.
    let mut bytes = unhex(KERNEL_COUNTER_DUMP);
    bytes[6] |= 0x10;
    assert!(parse_dump(&bytes).expect("parse").interrupted);
    // A length running past the datagram is refused, not read past.
    let mut bytes = unhex(KERNEL_COUNTER_DUMP);
    bytes[0] = 0xff;
    assert!(parse_dump(&bytes).is_err());
    // An error answer carries the errno.
    let mut err = vec![36, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    err.extend_from_slice(&(-1i32).to_ne_bytes());
    err.extend_from_slice(&[0; 16]);
    assert!(matches!(
        parse_dump(&err),
        Err(lb_forwarder::nftnl::NftnlError::Refused(1))
    ));
}

/// Reading over netlink gives what `nft` lists, in a lab namespace.
#[test]
fn netlink_counters_match_nft_list() {
    let lab = tandem_lab::Lab::new().expect("lab");
    let ns = lab.netns("fw").expect("netns");
    ns.exec(
        "nft",
        &["add table inet tandem; add counter inet tandem in_a { packets 3 bytes 300 }; add table inet other; add counter inet other in_b"],
    )
    .expect("nft");
    let read = ns
        .run(lb_forwarder::nftnl::read_counters)
        .expect("ns thread")
        .expect("netlink");
    assert_eq!(
        read,
        HashMap::from([(
            "in_a".to_owned(),
            Count {
                packets: 3,
                bytes: 300
            }
        )]),
        "Tandem's tables only"
    );
}
