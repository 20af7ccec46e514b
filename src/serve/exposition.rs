//! Reading the Prometheus text exposition format back (`/metrics` pages): for
//! `marquee status` and the dashboard, which show what the metrics say.

use std::collections::BTreeMap;

/// A series' labels: name and value pairs.
pub type Labels = Vec<(String, String)>;

/// Samples of one `/metrics` page: name, labels, value.
#[derive(Debug, Default)]
pub struct Samples(Vec<(String, Labels, f64)>);

impl Samples {
    /// Parses the Prometheus text format (comments and malformed lines are skipped).
    pub fn parse(page: &str) -> Self {
        let mut samples = Vec::new();
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Self(samples)
    }

    /// The values of `name`'s series that carry every one of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.0
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
    }

    /// The value of `name` for one input partition.
    pub fn partition(&self, name: &str, topic: &str, partition: &str) -> Option<f64> {
        self.matching(name, &[("topic", topic), ("partition", partition)])
            .next()
    }

    /// The sum of `name` over the series of one input partition (e.g. over reasons).
    pub fn sum_where(&self, name: &str, topic: &str, partition: &str) -> f64 {
        self.matching(name, &[("topic", topic), ("partition", partition)])
            .sum()
    }

    /// The value of `name` per `task` label.
    pub fn per_task(&self, name: &str) -> BTreeMap<String, u64> {
        self.by_label(name, &[], "task")
            .into_iter()
            .map(|(task, v)| (task, v as u64))
            .collect()
    }

    /// Every series of `name`: its labels and value.
    pub fn series<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a [(String, String)], f64)> + 'a {
        self.0
            .iter()
            .filter(move |(n, _, _)| n == name)
            .map(|(_, l, v)| (l.as_slice(), *v))
    }
}

impl Samples {
    /// The values of `name`'s series that carry `labels`, by their `key` label.
    pub fn by_label(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        key: &str,
    ) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .filter_map(|(_, l, v)| Some((l.iter().find(|(k, _)| k == key)?.1.clone(), *v)))
            .collect()
    }

    /// The sum of every series of `name`.
    pub fn total(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum::<f64>()
            + 0.0 // an empty sum is -0.0
    }
}

/// `a="x",b="y"` (values may hold escaped quotes and commas).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, tail)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = tail.char_indices();
        let mut end = tail.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').trim().to_string(), value));
        rest = &tail[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_read_with_its_labels() {
        let page = "# HELP x\nmarquee_records_late_total{topic=\"plays\",partition=\"1\"} 7\n\
                    marquee_records_dead_lettered_total{topic=\"plays\",partition=\"1\",reason=\"truncated\"} 2\n\
                    marquee_records_dead_lettered_total{topic=\"plays\",partition=\"1\",reason=\"bad_payload\"} 3\n\
                    marquee_restore_remaining_records{task=\"input\"} 12\n\
                    marquee_state_store_size_bytes 1024\n\
                    odd{value=\"a \\\"q\\\", b\"} 1\n\
                    broken line\n";
        let m = Samples::parse(page);
        assert_eq!(
            m.partition("marquee_records_late_total", "plays", "1"),
            Some(7.0)
        );
        assert_eq!(
            m.partition("marquee_records_late_total", "plays", "2"),
            None
        );
        assert_eq!(
            m.sum_where("marquee_records_dead_lettered_total", "plays", "1"),
            5.0
        );
        assert_eq!(
            m.per_task("marquee_restore_remaining_records"),
            BTreeMap::from([("input".to_string(), 12)])
        );
        assert_eq!(
            m.matching("marquee_state_store_size_bytes", &[]).next(),
            Some(1024.0)
        );
        assert_eq!(
            m.matching("odd", &[("value", "a \"q\", b")]).next(),
            Some(1.0)
        );
    }
}
