//! The `process_*` series Prometheus users expect of every exporter (the
//! names and meanings of the Go and Python clients' process collectors),
//! read from `/proc/self` at scrape time. prometheus-client has no such
//! collector, so this is the small Linux-only one Tandem needs.

use std::fmt;
use std::fs;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// What one scrape read of this process. Fields the kernel did not give
/// (an unreadable file) are `None` and their series are left out.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub threads: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self/{stat,fd,limits}` and `/proc/stat` (boot time).
    pub fn read() -> ProcessStats {
        let ticks = clock_ticks();
        let page = page_size();
        let boot = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        let mut stats = fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_stat(&s, ticks, page, boot))
            .unwrap_or_default();
        stats.open_fds = fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64);
        stats.max_fds = fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| max_open_files(&s));
        stats
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_size() -> f64 {
    // SAFETY: as above.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as f64 } else { 4096.0 }
}

/// `btime` of /proc/stat: the boot time in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// /proc/self/stat (proc(5)): the command name is in parentheses and may
/// hold spaces, so fields are counted from the last `)`. After it come
/// field 3 (state) onwards: utime 14, stime 15, num_threads 20,
/// starttime 22 (ticks since boot), vsize 23 (bytes), rss 24 (pages).
pub fn parse_stat(stat: &str, ticks: f64, page: f64, boot: Option<f64>) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<f64> { f.get(n - 3)?.parse::<f64>().ok() };
    let cpu = field(14)? / ticks + field(15)? / ticks;
    Some(ProcessStats {
        cpu_seconds: Some(cpu),
        resident_bytes: field(24).map(|p| p * page),
        virtual_bytes: field(23),
        start_time_seconds: boot.zip(field(22)).map(|(b, s)| b + s / ticks),
        threads: field(20),
        open_fds: None,
        max_fds: None,
    })
}

/// The soft "Max open files" limit of /proc/self/limits.
pub fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The collector: registered on a registry without prefix, so the series
/// are `process_cpu_seconds_total`, `process_resident_memory_bytes`, ...
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = ProcessStats::read();
        if let Some(v) = s.cpu_seconds {
            let c = ConstCounter::new(v);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
            ("process_threads", "Number of OS threads", s.threads),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
                g.encode(m)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis, as proc(5) allows.
        let stat = "4242 (my (daemon) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 150 0 0 20 0 7 0 12000 104857600 2560 18446744073709551615";
        let s = parse_stat(stat, 100.0, 4096.0, Some(1_700_000_000.0)).unwrap();
        assert_eq!(s.cpu_seconds, Some(4.0));
        assert_eq!(s.threads, Some(7.0));
        assert_eq!(s.virtual_bytes, Some(104_857_600.0));
        assert_eq!(s.resident_bytes, Some(2560.0 * 4096.0));
        assert_eq!(s.start_time_seconds, Some(1_700_000_120.0));
    }

    #[test]
    fn truncated_stat_is_none() {
        assert_eq!(parse_stat("1 (x) S 1 2", 100.0, 4096.0, None), None);
        assert_eq!(parse_stat("no parenthesis", 100.0, 4096.0, None), None);
    }

    #[test]
    fn limits_and_boot_time() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024.0));
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1765000000\n"),
            Some(1_765_000_000.0)
        );
    }

    #[test]
    fn this_process_reads() {
        let s = ProcessStats::read();
        assert!(s.cpu_seconds.is_some() && s.resident_bytes.unwrap_or(0.0) > 0.0);
        assert!(s.open_fds.unwrap_or(0.0) >= 3.0 && s.max_fds.is_some());
        assert!(s.start_time_seconds.unwrap_or(0.0) > 1_600_000_000.0);
    }
}
