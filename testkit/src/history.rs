//! A history checker in the spirit of Jepsen's Kafka workload.
//!
//! A test logs what producers had acknowledged and what consumers read, each as
//! `(topic, partition, offset, value)`, with every value written once. [`History::check`] then
//! reports:
//!
//! | anomaly             | meaning                                                           |
//! |---------------------|-------------------------------------------------------------------|
//! | lost                | acknowledged, never read at its offset, although a later offset   |
//! |                     | of the partition was read or a complete read found the log's end  |
//! | inconsistent offset | one offset seen with two values (by readers or acknowledgements)  |
//! | non-monotonic read  | a reader went back within a partition (offset ≤ the previous one) |
//! | skipped read        | a reader jumped over offsets within a partition                   |
//! | duplicate           | one value at two offsets (written twice)                          |
//!
//! and, not anomalies: `unread` (acknowledged, and nothing at or after it was read, so the
//! history cannot tell) and `redelivered` (reads of an offset its reader had already read, the
//! price of at-least-once).
//!
//! Reads come in two kinds. [`History::read`] is a read of an *ordered* reader session, such as
//! one standalone consumer: it must go through each partition one offset at a time, so rewinds
//! and skips are reported. [`History::read_unordered`] is for reads whose order means nothing,
//! such as a consumer group's members: a partition moves between members and each starts from
//! the last committed offset, so only loss, consistency and duplicates are checked.
//!
//! ```
//! use sluice_testkit::history::History;
//!
//! let mut history = History::default();
//! history.acknowledged("orders", 0, 0, "a");
//! history.acknowledged("orders", 0, 1, "b");
//! history.read("consumer-1", "orders", 0, 0, "a");
//! history.read("consumer-1", "orders", 0, 1, "b");
//! let report = history.check();
//! assert!(report.is_valid(), "{report}");
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// Where a record is: topic, partition, offset.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

impl Position {
    pub fn new(topic: &str, partition: u32, offset: u64) -> Position {
        Position {
            topic: topic.to_owned(),
            partition,
            offset,
        }
    }

    fn topic_partition(&self) -> (String, u32) {
        (self.topic.clone(), self.partition)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

#[derive(Clone, Debug)]
struct Read {
    reader: String,
    ordered: bool,
    position: Position,
    value: String,
}

/// What producers acknowledged and consumers read. Add events in the order they happened for
/// each reader; acknowledgements may come in any order.
#[derive(Clone, Debug, Default)]
pub struct History {
    acknowledged: Vec<(Position, String)>,
    reads: Vec<Read>,
    log_ends: BTreeMap<(String, u32), u64>,
}

impl History {
    /// A producer was told `value` is at this position.
    pub fn acknowledged(&mut self, topic: &str, partition: u32, offset: u64, value: &str) {
        self.acknowledged
            .push((Position::new(topic, partition, offset), value.to_owned()));
    }

    /// The ordered reader session `reader` read `value` at this position.
    pub fn read(&mut self, reader: &str, topic: &str, partition: u32, offset: u64, value: &str) {
        self.push_read(reader, true, topic, partition, offset, value);
    }

    /// `reader` read `value` at this position, in no meaningful order (group members).
    pub fn read_unordered(
        &mut self,
        reader: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        value: &str,
    ) {
        self.push_read(reader, false, topic, partition, offset, value);
    }

    fn push_read(
        &mut self,
        reader: &str,
        ordered: bool,
        topic: &str,
        partition: u32,
        offset: u64,
        value: &str,
    ) {
        self.reads.push(Read {
            reader: reader.to_owned(),
            ordered,
            position: Position::new(topic, partition, offset),
            value: value.to_owned(),
        });
    }

    /// A complete read of the partition, after the last acknowledgement, found the end of the
    /// log at `end_offset`: an acknowledged record it did not read is lost, not unread.
    pub fn log_end(&mut self, topic: &str, partition: u32, end_offset: u64) {
        self.log_ends
            .insert((topic.to_owned(), partition), end_offset);
    }

    /// Acknowledgements recorded so far.
    pub fn acknowledged_count(&self) -> usize {
        self.acknowledged.len()
    }

    /// Reads recorded so far.
    pub fn read_count(&self) -> usize {
        self.reads.len()
    }

    /// Looks for every anomaly (see the module docs).
    pub fn check(&self) -> Report {
        let mut report = Report {
            acknowledged: self.acknowledged.len(),
            reads: self.reads.len(),
            ..Report::default()
        };
        // Every value seen at each position, from reads and acknowledgements; and from reads
        // alone, which is what says an acknowledged record survived.
        let mut values_at: HashMap<&Position, BTreeSet<&str>> = HashMap::new();
        let mut read_values_at: HashMap<&Position, BTreeSet<&str>> = HashMap::new();
        let mut positions_of: HashMap<&str, BTreeSet<&Position>> = HashMap::new();
        let mut highest_read: HashMap<(&str, u32), u64> = HashMap::new();
        for (position, value) in &self.acknowledged {
            values_at.entry(position).or_default().insert(value);
            positions_of.entry(value).or_default().insert(position);
        }
        for read in &self.reads {
            values_at
                .entry(&read.position)
                .or_default()
                .insert(&read.value);
            read_values_at
                .entry(&read.position)
                .or_default()
                .insert(&read.value);
            positions_of
                .entry(&read.value)
                .or_default()
                .insert(&read.position);
            let highest = highest_read
                .entry((read.position.topic.as_str(), read.position.partition))
                .or_insert(read.position.offset);
            *highest = (*highest).max(read.position.offset);
        }
        report.distinct_values_read = self
            .reads
            .iter()
            .map(|read| read.value.as_str())
            .collect::<BTreeSet<_>>()
            .len();

        let mut acknowledged: Vec<&(Position, String)> = self.acknowledged.iter().collect();
        acknowledged.sort();
        acknowledged.dedup();
        for (position, value) in acknowledged {
            let survived = read_values_at
                .get(position)
                .is_some_and(|values| values.contains(value.as_str()));
            if survived {
                continue;
            }
            let later_read = highest_read
                .get(&(position.topic.as_str(), position.partition))
                .is_some_and(|highest| *highest > position.offset);
            let complete_read = self.log_ends.contains_key(&position.topic_partition());
            let entry = (position.clone(), value.clone());
            if later_read || complete_read {
                report.lost.push(entry);
            } else {
                report.unread.push(entry);
            }
        }

        let mut inconsistent: Vec<(Position, Vec<String>)> = values_at
            .iter()
            .filter(|(_, values)| values.len() > 1)
            .map(|(position, values)| {
                (
                    (*position).clone(),
                    values.iter().map(|value| (*value).to_owned()).collect(),
                )
            })
            .collect();
        inconsistent.sort();
        report.inconsistent = inconsistent;

        let mut duplicated: Vec<(String, Vec<Position>)> = positions_of
            .iter()
            .filter(|(_, positions)| positions.len() > 1)
            .map(|(value, positions)| {
                (
                    (*value).to_owned(),
                    positions
                        .iter()
                        .map(|position| (*position).clone())
                        .collect(),
                )
            })
            .collect();
        duplicated.sort();
        report.duplicated = duplicated;

        // Order within each ordered reader session, and re-reads by any reader.
        let mut previous: HashMap<(&str, &str, u32), u64> = HashMap::new();
        let mut seen_by_reader: HashMap<(&str, &Position), u32> = HashMap::new();
        for read in &self.reads {
            let times = seen_by_reader
                .entry((read.reader.as_str(), &read.position))
                .or_insert(0);
            *times += 1;
            if *times > 1 {
                report.redelivered += 1;
            }
            if !read.ordered {
                continue;
            }
            let key = (
                read.reader.as_str(),
                read.position.topic.as_str(),
                read.position.partition,
            );
            let offset = read.position.offset;
            if let Some(previous) = previous.insert(key, offset) {
                let violation = OrderViolation {
                    reader: read.reader.clone(),
                    topic: read.position.topic.clone(),
                    partition: read.position.partition,
                    previous,
                    offset,
                };
                if offset <= previous {
                    report.nonmonotonic.push(violation);
                } else if offset > previous + 1 {
                    report.skipped.push(violation);
                }
            }
        }
        report
    }
}

/// A reader that went back (`offset <= previous`) or jumped ahead (`offset > previous + 1`)
/// within a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderViolation {
    pub reader: String,
    pub topic: String,
    pub partition: u32,
    pub previous: u64,
    pub offset: u64,
}

impl fmt::Display for OrderViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} read {}/{} offset {} after {}",
            self.reader, self.topic, self.partition, self.offset, self.previous
        )
    }
}

/// What [`History::check`] found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Acknowledgements in the history.
    pub acknowledged: usize,
    /// Reads in the history.
    pub reads: usize,
    /// Distinct values among the reads.
    pub distinct_values_read: usize,
    /// Acknowledged, and provably not in the log (see the module docs).
    pub lost: Vec<(Position, String)>,
    /// Acknowledged and never read, with nothing read at or after it: unknown.
    pub unread: Vec<(Position, String)>,
    /// Positions seen with more than one value.
    pub inconsistent: Vec<(Position, Vec<String>)>,
    /// Values seen at more than one position.
    pub duplicated: Vec<(String, Vec<Position>)>,
    pub nonmonotonic: Vec<OrderViolation>,
    pub skipped: Vec<OrderViolation>,
    /// Reads of a position its reader had read before.
    pub redelivered: usize,
}

impl Report {
    /// No anomaly: nothing lost, inconsistent, duplicated, out of order or skipped. `unread`
    /// and `redelivered` do not count; tests that read everything check `unread` themselves.
    pub fn is_valid(&self) -> bool {
        self.lost.is_empty()
            && self.inconsistent.is_empty()
            && self.duplicated.is_empty()
            && self.nonmonotonic.is_empty()
            && self.skipped.is_empty()
    }

    /// The counts on one line.
    pub fn summary(&self) -> String {
        format!(
            "acknowledged={} reads={} distinct_read={} lost={} unread={} inconsistent={} duplicated={} nonmonotonic={} skipped={} redelivered={}",
            self.acknowledged,
            self.reads,
            self.distinct_values_read,
            self.lost.len(),
            self.unread.len(),
            self.inconsistent.len(),
            self.duplicated.len(),
            self.nonmonotonic.len(),
            self.skipped.len(),
            self.redelivered
        )
    }
}

/// How many examples of each anomaly the report prints.
const EXAMPLES_SHOWN: usize = 10;

fn examples<T>(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    items: &[T],
    show: impl Fn(&T) -> String,
) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    writeln!(f, "{name} ({}):", items.len())?;
    for item in items.iter().take(EXAMPLES_SHOWN) {
        writeln!(f, "  {}", show(item))?;
    }
    if items.len() > EXAMPLES_SHOWN {
        writeln!(f, "  ... and {} more", items.len() - EXAMPLES_SHOWN)?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary())?;
        examples(f, "lost", &self.lost, |(position, value)| {
            format!("{position} = {value:?}")
        })?;
        examples(
            f,
            "inconsistent offsets",
            &self.inconsistent,
            |(position, values)| format!("{position} = {values:?}"),
        )?;
        examples(f, "duplicated", &self.duplicated, |(value, positions)| {
            let positions: Vec<String> = positions.iter().map(ToString::to_string).collect();
            format!("{value:?} at {}", positions.join(", "))
        })?;
        examples(
            f,
            "non-monotonic reads",
            &self.nonmonotonic,
            ToString::to_string,
        )?;
        examples(f, "skipped reads", &self.skipped, ToString::to_string)?;
        examples(f, "unread (unknown)", &self.unread, |(position, value)| {
            format!("{position} = {value:?}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three acknowledged records on one partition, all read in order.
    fn clean() -> History {
        let mut history = History::default();
        for (offset, value) in ["a", "b", "c"].into_iter().enumerate() {
            history.acknowledged("t", 0, offset as u64, value);
        }
        for (offset, value) in ["a", "b", "c"].into_iter().enumerate() {
            history.read("reader", "t", 0, offset as u64, value);
        }
        history
    }

    #[test]
    fn a_clean_history_has_no_anomaly() {
        let report = clean().check();
        assert!(report.is_valid(), "{report}");
        assert!(report.unread.is_empty());
        assert_eq!(report.acknowledged, 3);
        assert_eq!(report.reads, 3);
        assert_eq!(report.distinct_values_read, 3);
        assert_eq!(report.redelivered, 0);
    }

    #[test]
    fn an_acknowledged_record_missing_below_a_later_read_is_lost() {
        let mut history = History::default();
        history.acknowledged("t", 0, 0, "a");
        history.acknowledged("t", 0, 1, "b");
        history.acknowledged("t", 0, 2, "c");
        history.read("reader", "t", 0, 0, "a");
        // Offset 1 is never read by anyone; offset 2 is (by another reader).
        history.read("other", "t", 0, 2, "c");
        let report = history.check();
        assert_eq!(report.lost, [(Position::new("t", 0, 1), "b".to_owned())]);
        assert!(!report.is_valid());
    }

    #[test]
    fn an_acknowledged_tail_nobody_reached_is_unread_until_a_complete_read_says_lost() {
        let mut history = History::default();
        history.acknowledged("t", 0, 0, "a");
        history.acknowledged("t", 0, 1, "b");
        history.read("reader", "t", 0, 0, "a");
        let report = history.check();
        assert!(report.is_valid(), "{report}");
        assert_eq!(report.unread, [(Position::new("t", 0, 1), "b".to_owned())]);

        // A complete read ended at 1: the log no longer holds what was acknowledged at 1.
        history.log_end("t", 0, 1);
        let report = history.check();
        assert_eq!(report.lost, [(Position::new("t", 0, 1), "b".to_owned())]);
        assert!(report.unread.is_empty());
    }

    #[test]
    fn one_offset_with_two_values_is_inconsistent() {
        // Acknowledged as "b", read as "x": the acknowledged value is also lost.
        let mut history = clean();
        history.read("late", "t", 0, 1, "x");
        let report = history.check();
        assert_eq!(
            report.inconsistent,
            [(
                Position::new("t", 0, 1),
                vec!["b".to_owned(), "x".to_owned()]
            )]
        );
        assert!(report.lost.is_empty(), "b was read at 1 too");

        // Two readers disagree about an offset nobody acknowledged.
        let mut history = History::default();
        history.read("one", "t", 3, 7, "p");
        history.read("two", "t", 3, 7, "q");
        let report = history.check();
        assert_eq!(report.inconsistent.len(), 1);
        assert!(!report.is_valid());
    }

    #[test]
    fn going_back_within_a_partition_is_non_monotonic() {
        let mut history = clean();
        history.read("reader", "t", 0, 1, "b");
        let report = history.check();
        assert_eq!(
            report.nonmonotonic,
            [OrderViolation {
                reader: "reader".into(),
                topic: "t".into(),
                partition: 0,
                previous: 2,
                offset: 1,
            }]
        );
        // The repeated read is also a redelivery, and nothing else is wrong.
        assert_eq!(report.redelivered, 1);
        assert!(report.skipped.is_empty() && report.lost.is_empty());
        assert!(!report.is_valid());
    }

    #[test]
    fn jumping_over_offsets_is_a_skip() {
        let mut history = History::default();
        history.read("reader", "t", 0, 0, "a");
        history.read("reader", "t", 0, 1, "b");
        history.read("reader", "t", 0, 3, "d");
        let report = history.check();
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(
            (report.skipped[0].previous, report.skipped[0].offset),
            (1, 3)
        );
        assert!(!report.is_valid());
    }

    #[test]
    fn order_is_per_reader_and_partition_and_unordered_reads_are_exempt() {
        let mut history = History::default();
        // Two readers, two partitions, interleaved: each sequence is in order.
        history.read("one", "t", 0, 0, "a0");
        history.read("two", "t", 0, 0, "a0");
        history.read("one", "t", 1, 5, "b5");
        history.read("one", "t", 0, 1, "a1");
        history.read("one", "t", 1, 6, "b6");
        history.read("two", "t", 0, 1, "a1");
        // A group rereads from a committed offset and jumps: not an anomaly for it.
        history.read_unordered("group", "t", 0, 1, "a1");
        history.read_unordered("group", "t", 0, 0, "a0");
        history.read_unordered("group", "t", 1, 6, "b6");
        history.read_unordered("group", "t", 0, 0, "a0");
        let report = history.check();
        assert!(report.is_valid(), "{report}");
        assert_eq!(report.redelivered, 1, "the group read t/0@0 twice");
    }

    #[test]
    fn one_value_at_two_offsets_is_a_duplicate() {
        let mut history = clean();
        history.acknowledged("t", 0, 3, "c");
        history.read("reader", "t", 0, 3, "c");
        let report = history.check();
        assert_eq!(
            report.duplicated,
            [(
                "c".to_owned(),
                vec![Position::new("t", 0, 2), Position::new("t", 0, 3)]
            )]
        );
        assert!(!report.is_valid());
    }

    #[test]
    fn the_report_prints_a_summary_and_examples() {
        let mut history = clean();
        history.read("reader", "t", 0, 5, "f");
        let report = history.check();
        let text = report.to_string();
        assert!(text.starts_with("acknowledged=3 reads=4"), "{text}");
        assert!(text.contains("skipped reads (1):"), "{text}");
        assert!(text.contains("reader read t/0 offset 5 after 2"), "{text}");
    }
}
