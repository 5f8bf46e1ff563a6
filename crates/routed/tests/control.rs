//! BIRD's control-socket replies, as captured from BIRD 2.0.12 in a lab
//! namespace, decoded byte for byte.

use routed::control::{DecodeError, Line, decode, protocols};

const GREETING: &[u8] = b"0001 BIRD 2.0.12 ready.\n";
const CONFIGURED: &[u8] = b"0002-Reading configuration from n1.conf\n0003 Reconfigured\n";
const PARSE_ERROR: &[u8] =
    b"0002-Reading configuration from n1.conf\n8002 n1.conf:7:1 syntax error, unexpected GARBAGE\n";
const PROTOCOLS: &[u8] = b"2002-Name       Proto      Table      State  Since         Info\n1002-device1    Device     ---        up     01:54:52.280  \n bfd1       BFD        ---        up     01:54:52.280  \n tandem_vips Static     master4    up     01:54:52.280  \n tor1       BGP        ---        up     01:54:53.065  Established   \n0000 \n";
const PROTOCOLS_LONG: &[u8] = b"2002-Name       Proto      Table      State  Since         Info\n1002-peer_tor1  BGP        ---        start  2026-12-07 01:54:44  Active        Socket: Connection refused\n0000 \n";

#[test]
fn greeting_is_one_final_line() {
    let (r, used) = decode(GREETING).expect("decode").expect("complete");
    assert_eq!(used, GREETING.len());
    assert_eq!(r.code(), 1);
    assert_eq!(r.message(), "BIRD 2.0.12 ready.");
    assert!(!r.is_error());
}

#[test]
fn configure_success_and_parse_error() {
    let (ok, _) = decode(CONFIGURED).expect("decode").expect("complete");
    assert_eq!(
        ok.lines,
        [
            Line {
                code: 2,
                text: "Reading configuration from n1.conf".into()
            },
            Line {
                code: 3,
                text: "Reconfigured".into()
            },
        ]
    );
    assert!(!ok.is_error());
    let (bad, _) = decode(PARSE_ERROR).expect("decode").expect("complete");
    assert!(bad.is_error());
    assert_eq!(bad.code(), 8002);
    assert_eq!(
        bad.message(),
        "n1.conf:7:1 syntax error, unexpected GARBAGE"
    );
}

#[test]
fn an_incomplete_reply_waits_for_more_bytes() {
    for cut in [0, 10, CONFIGURED.len() - 1] {
        assert_eq!(
            decode(&CONFIGURED[..cut]).expect("decode"),
            None,
            "cut at {cut}"
        );
    }
    // Two replies back to back: the first is taken, the rest left.
    let mut two = GREETING.to_vec();
    two.extend_from_slice(CONFIGURED);
    let (r, used) = decode(&two).expect("decode").expect("complete");
    assert_eq!(r.code(), 1);
    assert_eq!(&two[used..], CONFIGURED);
}

#[test]
fn continuation_lines_inherit_the_code_and_rows_are_parsed() {
    let (r, _) = decode(PROTOCOLS).expect("decode").expect("complete");
    assert_eq!(r.code(), 0);
    let rows = protocols(&r);
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["device1", "bfd1", "tandem_vips", "tor1"]);
    let tor1 = &rows[3];
    assert_eq!((tor1.proto.as_str(), tor1.state.as_str()), ("BGP", "up"));
    assert_eq!(tor1.since, "01:54:53.065");
    assert_eq!(tor1.info, "Established");
    assert_eq!(rows[0].info, "");

    let (r, _) = decode(PROTOCOLS_LONG).expect("decode").expect("complete");
    let rows = protocols(&r);
    assert_eq!(rows[0].since, "2026-12-07 01:54:44");
    assert_eq!(rows[0].state, "start");
    assert_eq!(rows[0].info, "Active Socket: Connection refused");
}

#[test]
fn garbage_is_an_error_not_a_hang() {
    assert_eq!(
        decode(b"hello\n"),
        Err(DecodeError::BadLine(1, "hello".into()))
    );
    assert_eq!(decode(b"0001 \xff\n"), Err(DecodeError::NotUtf8));
}
