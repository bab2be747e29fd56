//! The process's own gauges, read from `/proc/self` at each scrape under the
//! names Prometheus' process collectors use, so existing dashboards fit:
//! resident memory, open descriptors, CPU seconds, start time. On a system
//! without `/proc` they stay 0.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// The process gauges.
#[derive(Debug)]
pub(super) struct Process {
    rss: Gauge,
    fds: Gauge,
    cpu: Counter<f64, AtomicU64>,
    /// One refresh at a time (the CPU counter adds differences).
    refreshing: std::sync::Mutex<()>,
}

impl Process {
    /// Registers the gauges in `root` (the `process_` registry).
    pub(super) fn register(root: &mut Registry) -> Self {
        let rss = Gauge::default();
        root.register_with_unit(
            "resident_memory",
            "Resident memory size",
            Unit::Bytes,
            rss.clone(),
        );
        let fds = Gauge::default();
        root.register("open_fds", "Open file descriptors", fds.clone());
        let cpu = Counter::<f64, AtomicU64>::default();
        root.register_with_unit(
            "cpu",
            "User and system CPU time spent",
            Unit::Seconds,
            cpu.clone(),
        );
        let started = Gauge::<f64, AtomicU64>::default();
        root.register_with_unit(
            "start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            started.clone(),
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        started.set(now);
        Self {
            rss,
            fds,
            cpu,
            refreshing: std::sync::Mutex::new(()),
        }
    }

    /// Reads the current values.
    pub(super) fn refresh(&self) {
        let _one = keyferry_common::sync::lock(&self.refreshing);
        if let Some(pages) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        {
            let bytes = pages.saturating_mul(rustix::param::page_size() as u64);
            self.rss.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory's own descriptor is among them.
            let n = dir.count().saturating_sub(1);
            self.fds.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| cpu_ticks(&s))
        {
            #[allow(clippy::cast_precision_loss)]
            let secs = ticks as f64 / rustix::param::clock_ticks_per_second() as f64;
            // A counter only goes up: it takes the difference.
            let before = self.cpu.get();
            if secs > before {
                self.cpu.inc_by(secs - before);
            }
        }
    }
}

/// User plus system time, in clock ticks, from `/proc/self/stat` (fields 14
/// and 15, counted after the command name, which may hold spaces and
/// parentheses: the last `)` ends it).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user.saturating_add(system))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_found_after_a_command_name_with_spaces() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        assert_eq!(cpu_ticks(stat), Some(10));
        assert_eq!(cpu_ticks("no parenthesis"), None);
    }
}
