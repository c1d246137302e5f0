//! The results: one [`Row`] per measurement, printed as a Markdown table and written
//! as CSV.

use std::fmt::Write as _;

use super::stats::{Summary, ms};

/// One measurement. Latency is what the measurement is about (delivery time, request
/// time); `process` says whose CPU and RSS the row shows.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// `P1` .. `P8`.
    pub id: &'static str,
    pub name: String,
    pub agents: usize,
    pub latency: Option<Summary>,
    /// Events per second (P3).
    pub rate: Option<f64>,
    /// `hub` or `agent`.
    pub process: &'static str,
    pub cpu_cores: Option<f64>,
    /// RSS at the end of the measurement.
    pub rss_mib: Option<f64>,
    pub rss_peak_mib: Option<f64>,
    /// PostgreSQL's processes serving the bench database.
    pub postgres_cores: Option<f64>,
    /// Cores the bench itself (simulated agents, kubesim) used meanwhile.
    pub bench_cores: Option<f64>,
    /// 1-minute load average before the measurement started.
    pub load: f64,
    /// Cores other processes used during the measurement.
    pub others_cores: Option<f64>,
    /// Failed requests of the simulated agents (retried).
    pub errors: u64,
    pub note: String,
}

impl Row {
    pub fn new(id: &'static str, name: impl Into<String>, agents: usize) -> Row {
        Row {
            id,
            name: name.into(),
            agents,
            process: "hub",
            ..Row::default()
        }
    }

    /// A measurement that could not be made, saying why.
    pub fn not_measured(id: &'static str, name: &str, agents: usize, why: &str) -> Row {
        let mut row = Row::new(id, name, agents);
        row.process = "";
        row.note = format!("not measured: {why}");
        row
    }

    /// Takes the CPU and memory figures of a monitored stretch.
    pub fn record(&mut self, usage: &super::procfs::Usage) {
        self.cpu_cores = Some(usage.cpu_cores);
        self.rss_mib = Some(usage.rss_last_mib);
        self.rss_peak_mib = Some(usage.rss_max_mib);
        self.postgres_cores = usage.postgres_cores;
        self.bench_cores = Some(usage.bench_cores);
        self.others_cores = Some(usage.others_cores);
    }

    /// A measurement that failed; the run goes on with the next one.
    pub fn failed(id: &'static str, name: &str, agents: usize, err: &super::BenchError) -> Row {
        eprintln!("bench: {id} {name} failed: {}", super::error_chain(err));
        Row::not_measured(id, name, agents, &super::error_chain(err))
    }

    pub fn is_measured(&self) -> bool {
        !self.note.starts_with("not measured")
    }
}

fn duration_cell(summary: Option<Summary>, pick: fn(&Summary) -> std::time::Duration) -> String {
    summary.map_or_else(String::new, |s| {
        let value = ms(pick(&s));
        if value >= 1000.0 {
            format!("{:.2} s", value / 1000.0)
        } else if value >= 10.0 {
            format!("{value:.0} ms")
        } else {
            format!("{value:.1} ms")
        }
    })
}

fn cell(value: Option<f64>, unit: &str, decimals: usize) -> String {
    value.map_or_else(String::new, |v| format!("{v:.decimals$}{unit}"))
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| id | measurement | agents | p50 | p90 | p99 | max | events/s | process | CPU (cores) | RSS MiB (peak) | PostgreSQL CPU | bench CPU | others CPU | load | notes |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for row in rows {
        let rss = match (row.rss_mib, row.rss_peak_mib) {
            (Some(rss), Some(peak)) => format!("{rss:.0} ({peak:.0})"),
            (Some(rss), None) => format!("{rss:.0}"),
            (None, Some(peak)) => format!("({peak:.0})"),
            (None, None) => String::new(),
        };
        let mut note = row.note.clone();
        if row.errors > 0 {
            if !note.is_empty() {
                note.push_str("; ");
            }
            let _ = write!(note, "{} failed requests (retried)", row.errors);
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            row.id,
            row.name,
            row.agents,
            duration_cell(row.latency, |s| s.p50),
            duration_cell(row.latency, |s| s.p90),
            duration_cell(row.latency, |s| s.p99),
            duration_cell(row.latency, |s| s.max),
            cell(row.rate, "", 0),
            row.process,
            cell(row.cpu_cores, "", 3),
            rss,
            cell(row.postgres_cores, "", 3),
            cell(row.bench_cores, "", 2),
            cell(row.others_cores, "", 2),
            row.load,
            note.replace('|', "/"),
        );
    }
    out
}

/// The rows as CSV, numbers in fixed units (milliseconds, cores, MiB).
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "id,measurement,agents,samples,p50_ms,p90_ms,p99_ms,max_ms,events_per_s,process,cpu_cores,rss_mib,rss_peak_mib,postgres_cores,bench_cores,others_cores,load1,errors,notes\n",
    );
    let num = |value: Option<f64>| value.map_or_else(String::new, |v| format!("{v:.3}"));
    for row in rows {
        let latency =
            |pick: fn(&Summary) -> std::time::Duration| num(row.latency.map(|s| ms(pick(&s))));
        let fields = [
            row.id.to_owned(),
            quote(&row.name),
            row.agents.to_string(),
            row.latency
                .map_or_else(String::new, |s| s.count.to_string()),
            latency(|s| s.p50),
            latency(|s| s.p90),
            latency(|s| s.p99),
            latency(|s| s.max),
            num(row.rate),
            row.process.to_owned(),
            num(row.cpu_cores),
            num(row.rss_mib),
            num(row.rss_peak_mib),
            num(row.postgres_cores),
            num(row.bench_cores),
            num(row.others_cores),
            format!("{:.2}", row.load),
            row.errors.to_string(),
            quote(&row.note),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn quote(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample() -> Row {
        let mut row = Row::new("P1", "long-poll", 100);
        row.latency = Summary::of(&[Duration::from_millis(12), Duration::from_millis(1500)]);
        row.cpu_cores = Some(0.05);
        row.rss_mib = Some(30.0);
        row.rss_peak_mib = Some(41.0);
        row.note = "5 rounds, say \"hi\", then | more".into();
        row
    }

    #[test]
    fn markdown_has_a_header_and_one_line_per_row_with_units() {
        let table = markdown(&[
            sample(),
            Row::not_measured("P4", "agent idle", 1, "no binary"),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(
            lines[2].contains("| 12 ms | 1.50 s | 1.50 s | 1.50 s |"),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains("30 (41)"));
        assert!(
            !lines[2].contains("then | more"),
            "pipes in notes would break the table"
        );
        assert!(lines[3].contains("not measured: no binary"));
    }

    #[test]
    fn csv_quotes_notes_and_keeps_numbers_plain() {
        let text = csv(&[sample()]);
        let line = text.lines().nth(1).unwrap();
        assert!(
            line.starts_with(
                "P1,long-poll,100,2,12.000,1500.000,1500.000,1500.000,,hub,0.050,30.000,41.000"
            ),
            "{line}"
        );
        assert!(
            line.ends_with("\"5 rounds, say \"\"hi\"\", then | more\""),
            "{line}"
        );
    }
}
