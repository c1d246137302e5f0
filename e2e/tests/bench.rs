//! The benchmark harness works end to end: `bench --quick` with a tiny fleet runs every
//! measurement against the real binaries and writes a row for each. Timing goals are
//! for BENCHMARKS.md, never asserted here.

use std::collections::HashMap;
use std::process::Command;

/// Splits one CSV line, honouring double quotes.
fn fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[test]
fn quick_bench_measures_every_scenario_with_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bench.csv");
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--quick", "--agents", "20", "--csv"])
        .arg(&csv)
        .arg("--log-dir")
        .arg(dir.path().join("logs"))
        .output()
        .expect("failed to run the bench binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("| id | measurement |"),
        "no Markdown table:\n{stdout}"
    );

    let text = std::fs::read_to_string(&csv).expect("the bench wrote no CSV");
    let mut lines = text.lines();
    let header = fields(lines.next().unwrap());
    let rows: Vec<HashMap<&str, String>> = lines
        .map(|line| {
            header
                .iter()
                .map(String::as_str)
                .zip(fields(line))
                .collect()
        })
        .collect();
    let count = |id: &str| rows.iter().filter(|r| r["id"] == id).count();
    for (id, expected) in [
        ("P1", 3),
        ("P2", 1),
        ("P3", 2),
        ("P4", 1),
        ("P5", 2),
        ("P6", 1),
        ("P8", 1),
    ] {
        assert_eq!(count(id), expected, "{id} rows in:\n{text}");
    }
    for row in &rows {
        let what = format!("{} {}", row["id"], row["measurement"]);
        assert!(
            !row["notes"].starts_with("not measured"),
            "{what}: {}",
            row["notes"]
        );
        assert_eq!(
            row["errors"], "0",
            "{what}: the simulated agents' requests failed"
        );
        assert!(
            !row["notes"].contains("timed out"),
            "{what}: {}",
            row["notes"]
        );
        assert!(!row["cpu_cores"].is_empty(), "{what}: no CPU reading");
        assert!(!row["rss_mib"].is_empty(), "{what}: no RSS reading");
    }
    for row in rows.iter().filter(|r| r["id"] == "P1") {
        // Two pushes (one for polling every 10 s) delivered to all 20 agents.
        let samples: usize = row["samples"].parse().unwrap();
        assert!(
            samples == 40 || samples == 20,
            "{}: {samples} deliveries",
            row["measurement"]
        );
    }
    for row in rows.iter().filter(|r| r["id"] == "P8") {
        // Every agent's reconnecting request was answered by the new hub.
        assert_eq!(row["samples"], "20", "{}", row["notes"]);
    }
    for row in rows.iter().filter(|r| r["id"] == "P3") {
        let rate: f64 = row["events_per_s"].parse().unwrap();
        assert!(rate > 0.0, "{}: no events ingested", row["measurement"]);
        // "<accepted> events accepted, <stored> rows found in agent_events"
        let numbers: Vec<&str> = row["notes"]
            .split(|c: char| !c.is_ascii_digit())
            .filter(|n| !n.is_empty())
            .collect();
        let (accepted, stored) = (numbers[numbers.len() - 2], numbers[numbers.len() - 1]);
        assert_eq!(
            accepted, stored,
            "{}: every accepted event is stored",
            row["measurement"]
        );
    }
}
