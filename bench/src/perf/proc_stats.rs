//! CPU time and memory of a process, read from /proc (Linux).

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ: 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStats {
    /// User + system CPU seconds so far.
    pub cpu_seconds: f64,
    pub rss_kb: u64,
    /// Peak resident set size (VmHWM).
    pub peak_rss_kb: u64,
}

impl ProcStats {
    pub fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(Self {
            cpu_seconds: cpu_seconds(&stat)?,
            rss_kb: status_kb(pid, "VmRSS:").unwrap_or(0),
            peak_rss_kb: status_kb(pid, "VmHWM:").unwrap_or(0),
        })
    }
}

/// utime + stime from a /proc/<pid>/stat line. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after the last ')'.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "1234 (my (odd) proc) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 1000 50";
        assert_eq!(cpu_seconds(line), Some(3.0));
    }

    #[test]
    fn reads_this_process() {
        let s = ProcStats::read(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kb > 0 && s.peak_rss_kb >= s.rss_kb);
    }
}
