//! The benchmark report: one section per scenario, written as Markdown (for the README) and JSON.

use std::path::Path;

use serde::Serialize;

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
}

impl Row {
    pub fn new(metric: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Row {
            metric: metric.into(),
            value,
            unit,
            target: None,
            met: None,
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
                "\n## {}\n\n| metric | value | target | met |\n|---|---:|---|---|\n",
                section.title
            ));
            for row in &section.rows {
                let value = if row.value.abs() >= 100.0 {
                    format!("{:.0} {}", row.value, row.unit)
                } else {
                    format!("{:.3} {}", row.value, row.unit)
                };
                let met = match row.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                };
                out.push_str(&format!(
                    "| {} | {} | {} | {} |\n",
                    row.metric,
                    value.trim(),
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
