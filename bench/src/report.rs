//! The benchmark report: one section per scenario, written as Markdown (for the README) and JSON.

use std::path::Path;

use serde::Serialize;

use crate::compare::Spread;

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    /// The claim this row backs, e.g. "<= 1.25", if any.
    pub target: Option<String>,
    /// Whether the target was met, if there is one.
    pub met: Option<bool>,
    /// For a figure measured round by round: its spread over the rounds (`value` is the median).
    pub spread: Option<Spread>,
}

impl Row {
    pub fn new(metric: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Row {
            metric: metric.into(),
            value,
            unit,
            target: None,
            met: None,
            spread: None,
        }
    }

    /// A figure measured round by round: the median, shown with its spread over the rounds.
    pub fn rounds(metric: impl Into<String>, spread: Spread, unit: &'static str) -> Self {
        Row {
            spread: Some(spread),
            ..Row::new(metric, spread.median, unit)
        }
    }

    /// Marks the row as backing "value <= bound".
    pub fn at_most(mut self, bound: f64) -> Self {
        self.target = Some(format!("<= {bound}"));
        self.met = Some(self.value <= bound);
        self
    }

    /// Marks the row as backing "value >= bound".
    pub fn at_least(mut self, bound: f64) -> Self {
        self.target = Some(format!(">= {bound}"));
        self.met = Some(self.value >= bound);
        self
    }
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    pub title: String,
    /// Where the figures are measured: in process, or over which protocol with which client.
    pub measured: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: String,
    pub quick: bool,
    pub sections: Vec<Section>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "# regcache benchmarks\n\n{} on {}{}\n",
            self.date,
            self.machine,
            if self.quick {
                " (quick mode: smoke only, not for claims)"
            } else {
                ""
            }
        );
        for section in &self.sections {
            out.push_str(&format!(
                "\n## {}\n\nMeasured {}.\n\n\
                 | metric | value | per-round spread | target | met |\n|---|---:|---|---|---|\n",
                section.title, section.measured
            ));
            for row in &section.rows {
                let met = match row.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                };
                let spread = row.spread.map_or(String::new(), |s| {
                    format!(
                        "{}–{} (IQR {}–{}, {} rounds)",
                        number(s.min),
                        number(s.max),
                        number(s.q1),
                        number(s.q3),
                        s.rounds
                    )
                });
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    row.metric,
                    format!("{} {}", number(row.value), row.unit).trim(),
                    spread,
                    row.target.as_deref().unwrap_or(""),
                    met
                ));
            }
            for note in &section.notes {
                out.push_str(&format!("\n{note}\n"));
            }
        }
        out
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("latest.md"), self.markdown())?;
        std::fs::write(dir.join("latest.json"), serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}

/// Three decimals for small figures, none for large ones.
fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}
