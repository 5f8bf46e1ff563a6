//! Logging. Under systemd every event goes to journald over its native
//! protocol, otherwise it is printed as readable text on stderr; both read
//! the same: the event's message followed by its fields, `key=value`.
//!
//! In the journal that whole line is the `MESSAGE` (so `journalctl -u vrrpd`
//! shows the context without `-o verbose`), and each field is also a
//! journal field of its own under its plain name upper-cased (`vip` →
//! `VIP=`, `vrid` → `VRID=`), so `journalctl VRID=51` filters on it. The
//! daemon's name is the `SYSLOG_IDENTIFIER`; the level is the `PRIORITY`
//! (error 3, warning 4, info 6, debug and trace 7); `CODE_FILE`,
//! `CODE_LINE` and `TARGET` (the Rust module) say where the event comes
//! from. A field whose name journald reserves for itself (`priority`,
//! `message`, `errno`, `unit`, …) is written with a `TANDEM_` prefix
//! (`TANDEM_PRIORITY=`).

use std::fmt::{self, Write as _};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Where journald receives native-protocol datagrams.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Logs to journald when systemd connected our stderr to the journal (the
/// `JOURNAL_STREAM` it sets names that very file), otherwise as readable
/// text on stderr. The level comes from `RUST_LOG` (default `info`).
pub fn init_logging(daemon: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_the_journal() {
        match JournalLayer::connect(daemon, Path::new(JOURNAL_SOCKET)) {
            Ok(layer) => {
                let _ = registry.with(layer).try_init();
                return;
            }
            Err(e) => {
                eprintln!(
                    "{daemon}: journald is not reachable at {JOURNAL_SOCKET} ({e}); logging to stderr"
                );
            }
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(LineFields)
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_target(false),
        )
        .try_init();
}

/// The stderr formatter's fields, written as in the journal's `MESSAGE`.
struct LineFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for LineFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut f = Fields::default();
        fields.record(&mut f);
        writer.write_str(&render_line(&[], &f))
    }
}

/// True when stderr is the stream systemd connected to the journal: the
/// device and inode in `JOURNAL_STREAM` are stderr's own (systemd.exec(5)).
/// A daemon started by hand from a unit's shell inherits the variable with
/// another stderr, and keeps printing there.
fn stderr_is_the_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// A `tracing` layer writing journald's native protocol
/// (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>).
pub struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
    identifier: String,
}

impl JournalLayer {
    /// A layer sending to the journald socket at `path`, entries identified
    /// as `identifier`. Fails if nothing receives there.
    pub fn connect(identifier: &str, path: &Path) -> io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        // journald discards an empty datagram: this only checks it listens.
        socket.send_to(&[], path)?;
        Ok(JournalLayer {
            socket,
            path: path.to_owned(),
            identifier: identifier.to_owned(),
        })
    }

    fn send(&self, payload: &[u8]) -> io::Result<()> {
        match self.socket.send_to(payload, &self.path) {
            Ok(_) => Ok(()),
            // Larger than a datagram may be: hand journald a sealed memfd.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EMSGSIZE as i32) => {
                self.send_memfd(payload)
            }
            Err(e) => Err(e),
        }
    }

    fn send_memfd(&self, payload: &[u8]) -> io::Result<()> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
        use std::io::Write as _;

        let fd = memfd_create(
            "tandem-journal",
            MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC,
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(payload)?;
        // journald maps the file only once nobody can change it any more.
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_WRITE
                    | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        let addr = UnixAddr::new(&self.path)?;
        let fds = [file.as_raw_fd()];
        sendmsg(
            self.socket.as_raw_fd(),
            &[],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            Some(&addr),
        )?;
        Ok(())
    }
}

/// A field's value as recorded: text is quoted in the line when it would
/// not read as one word; everything else is printed as formatted.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Formatted(String),
}

impl Value {
    fn raw(&self) -> &str {
        match self {
            Value::Text(s) | Value::Formatted(s) => s,
        }
    }
}

/// The message and the fields of an event (or of a span).
#[derive(Debug, Default)]
struct Fields {
    message: Option<String>,
    pairs: Vec<(&'static str, Value)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::Text(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The whole cause chain, as anyhow's `{:#}` prints it.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            let _ = write!(text, ": {s}");
            source = s.source();
        }
        self.put(field, Value::Text(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::Formatted(format!("{value:?}")));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "message" {
            self.message = Some(value.raw().to_owned());
        } else if !name.starts_with("log.") {
            // `log.*` are the target, file and line of a `log` record,
            // carried by tracing-log; they are read from the metadata.
            self.pairs.push((name, value));
        }
    }
}

/// The fields of an open span, kept in its extensions.
struct SpanFields(Fields);

/// The line an operator reads: `[span{k=v}: ]message k=v k="two words"`,
/// as the stderr formatter prints it (without time and level).
fn render_line(spans: &[(&str, &Fields)], event: &Fields) -> String {
    let mut line = String::new();
    for (name, fields) in spans {
        line.push_str(name);
        if !fields.pairs.is_empty() {
            line.push('{');
            push_pairs(&mut line, &fields.pairs, "");
            line.push('}');
        }
        line.push_str(": ");
    }
    line.push_str(event.message.as_deref().unwrap_or_default());
    let sep = if event.message.as_deref().is_some_and(|m| !m.is_empty()) {
        " "
    } else {
        ""
    };
    push_pairs(&mut line, &event.pairs, sep);
    line
}

fn push_pairs(line: &mut String, pairs: &[(&str, Value)], first_sep: &str) {
    for (i, (name, value)) in pairs.iter().enumerate() {
        line.push_str(if i == 0 { first_sep } else { " " });
        line.push_str(name);
        line.push('=');
        match value {
            Value::Text(s) if reads_as_one_word(s) => line.push_str(s),
            Value::Text(s) => {
                let _ = write!(line, "{s:?}");
            }
            Value::Formatted(s) => line.push_str(s),
        }
    }
}

fn reads_as_one_word(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=')
}

/// Fields journald sets itself or gives a meaning to
/// (systemd.journal-fields(7)), and the ones this layer writes.
const RESERVED: &[&str] = &[
    "MESSAGE",
    "MESSAGE_ID",
    "PRIORITY",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_FUNC",
    "ERRNO",
    "INVOCATION_ID",
    "USER_INVOCATION_ID",
    "DOCUMENTATION",
    "TID",
    "UNIT",
    "USER_UNIT",
    "TARGET",
];
const RESERVED_PREFIXES: &[&str] = &["SYSLOG_", "OBJECT_", "COREDUMP_", "TANDEM_"];

/// A field's journal name: upper case, `[A-Z0-9_]` only, not starting with
/// `_` (journald's trusted fields) or a digit, at most 64 bytes; a name
/// journald reserves gets the `TANDEM_` prefix.
pub fn journal_field_name(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let plain = upper.trim_start_matches('_');
    let mut out = if plain.is_empty()
        || plain.starts_with(|c: char| c.is_ascii_digit())
        || RESERVED.contains(&plain)
        || RESERVED_PREFIXES.iter().any(|p| plain.starts_with(p))
    {
        format!("TANDEM_{plain}")
    } else {
        plain.to_owned()
    };
    out.truncate(64);
    out
}

/// Appends one field in the native protocol: `NAME=value\n`, or, when the
/// value holds a newline, `NAME\n` + its length (64-bit little endian) +
/// the value + `\n`.
pub fn put_journal_field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// syslog priorities: error 3, warning 4, info 6, debug 7.
fn priority(level: Level) -> &'static [u8] {
    match level {
        Level::ERROR => b"3",
        Level::WARN => b"4",
        Level::INFO => b"6",
        Level::DEBUG | Level::TRACE => b"7",
    }
}

impl<S> tracing_subscriber::Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
            values.record(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());

        let spans: Vec<_> = ctx
            .event_scope(event)
            .map(|scope| scope.from_root().collect())
            .unwrap_or_default();
        let exts: Vec<_> = spans.iter().map(|s| s.extensions()).collect();
        let empty = Fields::default();
        let span_fields: Vec<(&str, &Fields)> = spans
            .iter()
            .zip(&exts)
            .map(|(s, e)| (s.name(), e.get::<SpanFields>().map_or(&empty, |f| &f.0)))
            .collect();

        let mut buf = Vec::with_capacity(256);
        let line = render_line(&span_fields, &fields);
        put_journal_field(&mut buf, "MESSAGE", line.as_bytes());
        put_journal_field(&mut buf, "PRIORITY", priority(*meta.level()));
        put_journal_field(&mut buf, "SYSLOG_IDENTIFIER", self.identifier.as_bytes());
        put_journal_field(&mut buf, "TARGET", meta.target().as_bytes());
        if let Some(file) = meta.file() {
            put_journal_field(&mut buf, "CODE_FILE", file.as_bytes());
        }
        if let Some(line) = meta.line() {
            put_journal_field(&mut buf, "CODE_LINE", line.to_string().as_bytes());
        }
        for (name, value) in span_fields
            .iter()
            .flat_map(|(_, f)| f.pairs.iter())
            .chain(fields.pairs.iter())
        {
            put_journal_field(&mut buf, &journal_field_name(name), value.raw().as_bytes());
        }
        if let Err(e) = self.send(&buf) {
            // journald is gone or full: the line still reaches the journal
            // through stderr, only without its fields.
            eprintln!("{line} (journald refused the entry: {e})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{Read as _, Seek as _};
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};

    #[test]
    fn field_names_are_plain_upper_case_and_reserved_ones_prefixed() {
        assert_eq!(journal_field_name("vip"), "VIP");
        assert_eq!(journal_field_name("vrid"), "VRID");
        assert_eq!(journal_field_name("took_ms"), "TOOK_MS");
        assert_eq!(journal_field_name("error.sources"), "ERROR_SOURCES");
        assert_eq!(journal_field_name("_secret"), "SECRET");
        assert_eq!(journal_field_name("priority"), "TANDEM_PRIORITY");
        assert_eq!(journal_field_name("message_id"), "TANDEM_MESSAGE_ID");
        assert_eq!(journal_field_name("syslog_pid"), "TANDEM_SYSLOG_PID");
        assert_eq!(journal_field_name("target"), "TANDEM_TARGET");
        assert_eq!(journal_field_name("1st"), "TANDEM_1ST");
        assert_eq!(journal_field_name("ümlaut"), "MLAUT");
        assert_eq!(journal_field_name(&"x".repeat(80)).len(), 64);
    }

    #[test]
    fn native_protocol_fields_byte_for_byte() {
        let mut buf = Vec::new();
        put_journal_field(&mut buf, "VIP", b"10.0.0.100/24");
        assert_eq!(buf, b"VIP=10.0.0.100/24\n");

        let mut buf = Vec::new();
        put_journal_field(&mut buf, "MESSAGE", b"a\nb");
        assert_eq!(
            buf,
            b"MESSAGE\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n".to_vec()
        );

        let mut buf = Vec::new();
        put_journal_field(&mut buf, "EMPTY", b"");
        assert_eq!(buf, b"EMPTY=\n");
    }

    /// Parses native-protocol entries back into (name, value) pairs.
    fn parse(mut data: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n').unwrap();
            let head = &data[..nl];
            if let Some(eq) = head.iter().position(|&b| b == b'=') {
                out.push((
                    String::from_utf8(head[..eq].to_vec()).unwrap(),
                    String::from_utf8(head[eq + 1..].to_vec()).unwrap(),
                ));
                data = &data[nl + 1..];
            } else {
                let name = String::from_utf8(head.to_vec()).unwrap();
                let len = u64::from_le_bytes(data[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = &data[nl + 9..nl + 9 + len];
                assert_eq!(data[nl + 9 + len], b'\n');
                out.push((name, String::from_utf8(value.to_vec()).unwrap()));
                data = &data[nl + 10 + len..];
            }
        }
        out
    }

    /// A fake journald: a datagram socket in a temporary directory.
    struct FakeJournal {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl FakeJournal {
        fn new() -> FakeJournal {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("socket");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            FakeJournal {
                _dir: dir,
                path,
                socket,
            }
        }

        /// The next entry, received inline or as a memfd.
        fn entry(&self) -> Vec<(String, String)> {
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let mut cmsg = nix::cmsg_space!([RawFd; 1]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let msg = nix::sys::socket::recvmsg::<()>(
                    self.socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .unwrap();
                let bytes = msg.bytes;
                let mut fd = None;
                for c in msg.cmsgs().unwrap() {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                        fd = Some(fds[0]);
                    }
                }
                if let Some(fd) = fd {
                    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                    // The sender's offset is at the end (journald maps the file).
                    file.seek(std::io::SeekFrom::Start(0)).unwrap();
                    let mut data = Vec::new();
                    file.read_to_end(&mut data).unwrap();
                    return parse(&data);
                }
                if bytes == 0 {
                    continue; // the connect probe
                }
                return parse(&buf[..bytes]);
            }
        }
    }

    fn fields(entry: &[(String, String)]) -> BTreeMap<&str, Vec<&str>> {
        let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (k, v) in entry {
            out.entry(k.as_str()).or_default().push(v.as_str());
        }
        out
    }

    #[test]
    fn an_event_becomes_a_message_with_its_context_and_plain_fields() {
        let journal = FakeJournal::new();
        let layer = JournalLayer::connect("vrrpd", &journal.path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                vip = "10.0.0.100/24",
                vrid = 51u8,
                interface = %"eth0",
                priority = 150u8,
                "floating IP {} added on {} (VRID {})",
                "10.0.0.100/24",
                "eth0",
                51
            );
        });
        let entry = journal.entry();
        let f = fields(&entry);
        assert_eq!(
            f["MESSAGE"],
            [
                "floating IP 10.0.0.100/24 added on eth0 (VRID 51) vip=10.0.0.100/24 vrid=51 interface=eth0 priority=150"
            ]
        );
        assert_eq!(f["VIP"], ["10.0.0.100/24"]);
        assert_eq!(f["VRID"], ["51"]);
        assert_eq!(f["INTERFACE"], ["eth0"]);
        assert_eq!(f["TANDEM_PRIORITY"], ["150"]);
        assert_eq!(f["PRIORITY"], ["6"], "info is syslog's info");
        assert_eq!(f["SYSLOG_IDENTIFIER"], ["vrrpd"]);
        assert_eq!(f["TARGET"], [module_path!()]);
        assert!(f["CODE_FILE"][0].ends_with("logging.rs"));
        assert!(f["CODE_LINE"][0].parse::<u32>().is_ok());
        assert!(
            !f.keys().any(|k| k.starts_with("F_")),
            "no prefixed fields: {f:?}"
        );
    }

    #[test]
    fn spans_errors_levels_and_multi_line_messages() {
        let journal = FakeJournal::new();
        let layer = JournalLayer::connect("lb-forwarder", &journal.path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("apply", farm = "web");
            let _g = span.enter();
            let err = std::io::Error::other("nft refused the ruleset");
            tracing::error!(
                error = &err as &dyn std::error::Error,
                reason = "two words",
                "datapath not applied"
            );
            tracing::warn!("invalid configuration in /etc/tandem:\nfarms/web.toml:3:8: bad port");
        });
        let first = journal.entry();
        let f = fields(&first);
        assert_eq!(
            f["MESSAGE"],
            [
                "apply{farm=web}: datapath not applied error=\"nft refused the ruleset\" reason=\"two words\""
            ]
        );
        assert_eq!(f["FARM"], ["web"]);
        assert_eq!(f["ERROR"], ["nft refused the ruleset"]);
        assert_eq!(f["PRIORITY"], ["3"]);
        let second = journal.entry();
        let f = fields(&second);
        assert_eq!(
            f["MESSAGE"],
            [
                "apply{farm=web}: invalid configuration in /etc/tandem:\nfarms/web.toml:3:8: bad port"
            ]
        );
        assert_eq!(f["PRIORITY"], ["4"]);
    }

    #[test]
    fn an_entry_too_large_for_a_datagram_goes_through_a_sealed_memfd() {
        let journal = FakeJournal::new();
        let layer = JournalLayer::connect("cfg-syncd", &journal.path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        let big = "x".repeat(4 << 20);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(size = big.len(), "{big}");
        });
        let entry = journal.entry();
        let f = fields(&entry);
        assert_eq!(f["MESSAGE"][0].len(), big.len() + " size=4194304".len());
        assert_eq!(f["SIZE"], ["4194304"]);
    }

    #[test]
    fn records_from_the_log_crate_keep_their_own_target_and_no_log_fields() {
        let journal = FakeJournal::new();
        let layer = JournalLayer::connect("clustermanager", &journal.path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let record = log::Record::builder()
                .args(format_args!("Security warning: mlock failed"))
                .level(log::Level::Warn)
                .target("russh_cryptovec::platform")
                .file(Some("platform/mod.rs"))
                .line(Some(37))
                .build();
            tracing_log::format_trace(&record).unwrap();
        });
        let entry = journal.entry();
        let f = fields(&entry);
        assert_eq!(f["MESSAGE"], ["Security warning: mlock failed"]);
        assert_eq!(f["TARGET"], ["russh_cryptovec::platform"]);
        assert_eq!(f["CODE_FILE"], ["platform/mod.rs"]);
        assert_eq!(f["CODE_LINE"], ["37"]);
        assert!(!f.keys().any(|k| k.starts_with("LOG")), "{f:?}");
    }

    #[test]
    fn stderr_reads_as_the_journal_message() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(LineFields)
                .with_writer(move || out.clone())
                .with_ansi(false)
                .with_target(false),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("apply", farm = "web");
            let _g = span.enter();
            tracing::info!(
                farms = 3u64,
                took_ms = 4u64,
                reason = "two words",
                "datapath applied: 3 farms in 4 ms"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.trim_end().ends_with(
                "INFO apply{farm=web}: datapath applied: 3 farms in 4 ms farms=3 took_ms=4 reason=\"two words\""
            ),
            "{text}"
        );
    }

    #[test]
    fn no_journal_listening_is_an_error_at_connect() {
        let dir = tempfile::tempdir().unwrap();
        assert!(JournalLayer::connect("vrrpd", &dir.path().join("nothing")).is_err());
    }
}
