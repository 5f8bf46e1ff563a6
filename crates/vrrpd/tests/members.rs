//! Who may speak for the virtual router, the foreign speakers table, the
//! rate limit of drop logs, the persisted maintenance flag and the floating
//! IPs' lifetime: pure parts of the shell, with time as an argument.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use vrrpd::maintenance::MaintenanceFile;
use vrrpd::members::{DropLog, ForeignSpeakers, Members, Verdict};
use vrrpd::setup::auto_lifetime;

const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 1));
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 2));
const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 9));

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

#[test]
fn ipv4_adverts_count_only_from_the_cluster_nodes() {
    let t = Instant::now();
    let mut m = Members::new(vec![ME], vec![ME, PEER], true);
    assert_eq!(m.classify(t, ME), Verdict::Own);
    assert_eq!(m.classify(t, PEER), Verdict::Member);
    assert_eq!(m.classify(t, STRANGER), Verdict::Foreign);
    // Switched off: the RFC's behaviour, anyone on the link speaks.
    let mut m = Members::new(vec![ME], vec![ME, PEER], false);
    assert_eq!(m.classify(t, STRANGER), Verdict::Member);
}

#[test]
fn an_ipv6_link_local_source_counts_once_verified_as_the_peers() {
    let t = Instant::now();
    let me = IpAddr::V6(v6("fd00::1"));
    let peer = IpAddr::V6(v6("fd00::2"));
    let mine = IpAddr::V6(v6("fe80::1"));
    let theirs = v6("fe80::2");
    let spoof = v6("fe80::66");
    let mut m = Members::new(vec![mine, me], vec![me, peer], true);
    assert_eq!(m.classify(t, mine), Verdict::Own);
    // Unknown link-local: dropped, verified once (not again while in flight).
    assert_eq!(
        m.classify(t, IpAddr::V6(theirs)),
        Verdict::Unverified { verify: true }
    );
    assert_eq!(
        m.classify(t, IpAddr::V6(theirs)),
        Verdict::Unverified { verify: false }
    );
    m.verified(t, theirs, Some(true));
    assert_eq!(m.classify(t, IpAddr::V6(theirs)), Verdict::Member);
    assert_eq!(m.peer_link_local(), Some(theirs));
    // A link-local with another MAC: foreign, and checked again after 30 s.
    assert_eq!(
        m.classify(t, IpAddr::V6(spoof)),
        Verdict::Unverified { verify: true }
    );
    m.verified(t, spoof, Some(false));
    assert_eq!(m.classify(t, IpAddr::V6(spoof)), Verdict::Foreign);
    assert_eq!(
        m.classify(t + Duration::from_secs(31), IpAddr::V6(spoof)),
        Verdict::Unverified { verify: true }
    );
    // Undecided (entries did not resolve): retried after a second.
    let other = v6("fe80::3");
    m.classify(t, IpAddr::V6(other));
    m.verified(t, other, None);
    assert_eq!(
        m.classify(t, IpAddr::V6(other)),
        Verdict::Unverified { verify: false }
    );
    assert_eq!(
        m.classify(t + Duration::from_secs(1), IpAddr::V6(other)),
        Verdict::Unverified { verify: true }
    );
    // A global address that is not a node's: foreign at once.
    assert_eq!(m.classify(t, IpAddr::V6(v6("fd00::9"))), Verdict::Foreign);
    // The peer's configured address itself (unicast from a global source).
    assert_eq!(m.classify(t, peer), Verdict::Member);
}

#[test]
fn foreign_speakers_are_listed_most_recent_first_and_bounded() {
    let mut f = ForeignSpeakers::new(2);
    assert!(f.record(STRANGER, 51, 254, 1000));
    assert!(!f.record(STRANGER, 51, 253, 2000));
    let other = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 10));
    assert!(f.record(other, 51, 100, 1500));
    let l = f.list();
    assert_eq!(l[0].address, STRANGER);
    assert_eq!(l[0].adverts, 2);
    assert_eq!(l[0].priority, 253);
    assert_eq!(l[1].address, other);
    // A third source evicts the least recently heard.
    let third = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 11));
    f.record(third, 51, 1, 3000);
    let l = f.list();
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|s| s.address != other));
}

#[test]
fn a_repeated_drop_is_logged_once_then_at_most_once_per_period() {
    let t = Instant::now();
    let every = Duration::from_secs(60);
    let mut d = DropLog::new(every, 4);
    assert_eq!(d.note(t, Some(STRANGER), "foreign"), Some(0));
    for i in 1..=99 {
        assert_eq!(
            d.note(
                t + Duration::from_millis(i * 100),
                Some(STRANGER),
                "foreign"
            ),
            None
        );
    }
    // Another kind or source is its own line.
    assert_eq!(d.note(t, Some(STRANGER), "vrid"), Some(0));
    assert_eq!(d.note(t, Some(PEER), "foreign"), Some(0));
    // After the period: one line saying how many were not logged.
    assert_eq!(d.note(t + every, Some(STRANGER), "foreign"), Some(99));
    // Bounded: a flood of sources does not grow the table past its cap.
    for i in 0..10u8 {
        let _ = d.note(t, Some(IpAddr::V4(Ipv4Addr::new(10, 9, 9, i))), "invalid");
    }
}

#[test]
fn maintenance_is_kept_across_restarts_in_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let f = MaintenanceFile::new(dir.path());
    assert_eq!(f.path(), dir.path().join("vrrpd/maintenance"));
    assert!(!f.load().unwrap());
    f.store(true, 42).unwrap();
    assert!(
        MaintenanceFile::new(dir.path()).load().unwrap(),
        "a new process sees it"
    );
    let text = std::fs::read_to_string(f.path()).unwrap();
    assert!(text.contains("unix_ms 42"), "{text}");
    assert!(!dir.path().join("vrrpd/.maintenance.tmp").exists());
    f.store(false, 43).unwrap();
    assert!(!f.load().unwrap());
    f.store(false, 44).unwrap();
    // An unwritable state dir is an error, not a silent success.
    let blocked = dir.path().join("file");
    std::fs::write(&blocked, "").unwrap();
    assert!(MaintenanceFile::new(&blocked).store(true, 45).is_err());
}

#[test]
fn the_floating_ip_lifetime_follows_master_down_interval() {
    let ms = Duration::from_millis;
    // 100 ms adverts: MDI 361 ms -> 1 s (expiry <= 1.25 s <= MDI + 1 s).
    assert_eq!(auto_lifetime(ms(361)), Duration::from_secs(1));
    // 10 ms: at least a second.
    assert_eq!(auto_lifetime(ms(36)), Duration::from_secs(1));
    // 1 s adverts: MDI 3.61 s -> 4 s (expiry <= 4.25 s <= 4.61 s).
    assert_eq!(auto_lifetime(ms(3609)), Duration::from_secs(4));
}
