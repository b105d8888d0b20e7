//! CPU time and peak memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use anyhow::Context as _;

/// Clock ticks per second of the `utime`/`stime` fields (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> anyhow::Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running `getconf CLK_TCK`")?;
    anyhow::ensure!(
        out.status.success(),
        "`getconf CLK_TCK` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let ticks: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("`getconf CLK_TCK` printed {text:?}"))?;
    anyhow::ensure!(ticks > 0.0, "`getconf CLK_TCK` printed {ticks}");
    Ok(ticks)
}

/// `utime + stime` in clock ticks from the contents of `/proc/<pid>/stat`.
pub fn cpu_ticks_from_stat(stat: &str) -> anyhow::Result<u64> {
    // The command name (field 2) is in parentheses and may contain spaces; fields after the
    // last ')' start with field 3 (state). utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' in /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        let raw = fields
            .get(n - 3)
            .with_context(|| format!("/proc/<pid>/stat has no field {n}"))?;
        raw.parse()
            .with_context(|| format!("/proc/<pid>/stat field {n} is {raw:?}"))
    };
    Ok(field(14)? + field(15)?)
}

/// `VmHWM` (peak resident set size) in bytes from the contents of `/proc/<pid>/status`.
pub fn peak_rss_from_status(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM line in /proc/<pid>/status")?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("unparsable {line:?}"))?;
    Ok(kib * 1024)
}

/// Resource usage of one process so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size, in bytes.
    pub peak_rss_bytes: u64,
}

/// Reads the usage of the running process `pid` (`"self"` works too).
pub fn usage(pid: &str, ticks_per_second: f64) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(Usage {
        cpu_seconds: cpu_ticks_from_stat(&stat)? as f64 / ticks_per_second,
        peak_rss_bytes: peak_rss_from_status(&status)?,
    })
}

/// CPU seconds of `pid` so far.
pub fn cpu_seconds(pid: &str, ticks_per_second: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(cpu_ticks_from_stat(&stat)? as f64 / ticks_per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces_and_parens() {
        let stat = "1234 (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 9 0 100 1000 10 18446744073709551615";
        assert_eq!(cpu_ticks_from_stat(stat).unwrap(), 287);
    }

    #[test]
    fn vmhwm_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t   20480 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(peak_rss_from_status(status).unwrap(), 20 * 1024 * 1024);
    }

    #[test]
    fn own_process_is_readable() {
        let ticks = clock_ticks_per_second().unwrap();
        let u = usage("self", ticks).unwrap();
        assert!(u.peak_rss_bytes > 0);
    }
}
