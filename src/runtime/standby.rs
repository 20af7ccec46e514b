//! Standby replicas: a warm copy of partitions that other instances own, kept by reading their
//! changelog topics (Kafka Streams' `num.standby.replicas`). When such a partition moves here,
//! its restore reads only what the copy has not yet applied.
//!
//! Which instance keeps which copy follows from the consumer group alone, so every member
//! agrees without talking to the others: members in `client.id` order, and each partition's
//! copies on the `replicas` members after its owner. The consumer group offers no hook to
//! place them with the assignment, so placement is read back from the group's coordinator
//! every [`REFRESH`] and after each rebalance.
//!
//! A copy is only ever changed by applying changelog records; the store records with them,
//! in the same batch, how far each changelog topic has been read. The copy stops being one
//! when its partition is assigned here (the restore catches it up and removes that mark) or
//! when placement moves it elsewhere (its entries are dropped).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::PipelineError;
use crate::io::changelog::{Changelog, RestoreContext};
use crate::io::source::{Member, Source};
use crate::metrics;
use crate::state::{Batch, Store};

/// How often placement is read back from the group's coordinator.
const REFRESH: Duration = Duration::from_secs(5);
/// How long after a failed read it is tried again (a broker down, or one without
/// DescribeGroups): the read blocks the task for up to two seconds.
const RETRY: Duration = Duration::from_secs(60);
/// Most changelog records applied per call of [`Standby::apply`], so the task's own records
/// wait little.
const APPLY_MAX: usize = 20_000;

/// The partitions whose standby copies `me` keeps: of each partition, the `replicas` members
/// after its owner in `client.id` order (fewer when the group is smaller). `None` when `me`
/// is not exactly one member (it has not joined yet, or shares its `client.id`).
pub fn placement(members: &[Member], me: &str, replicas: usize) -> Option<BTreeSet<i32>> {
    let mut order: Vec<&Member> = members.iter().collect();
    order.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    let mine: Vec<usize> = (0..order.len())
        .filter(|&i| order[i].client_id == me)
        .collect();
    let [me] = mine.as_slice() else {
        return None;
    };
    let n = order.len();
    let mut kept = BTreeSet::new();
    for (owner, member) in order.iter().enumerate() {
        let distance = (me + n - owner) % n;
        if distance >= 1 && distance <= replicas {
            kept.extend(member.partitions.iter().copied());
        }
    }
    Some(kept)
}

/// The standby copies of one task.
pub struct Standby {
    task: &'static str,
    replicas: usize,
    changelog: Changelog,
    consumer: Option<BaseConsumer<RestoreContext>>,
    /// Partitions kept warm, and the next offset of each store's changelog.
    kept: BTreeMap<i32, Vec<(&'static str, i64)>>,
    /// When placement is read next (`None`: at once).
    next_refresh: Option<Instant>,
    /// Placement could not be read or used; said once.
    warned: bool,
}

impl Standby {
    /// `replicas` standby copies of each partition of `task`'s stores, read from `changelog`.
    pub fn new(task: &'static str, replicas: usize, changelog: Changelog) -> Self {
        Self {
            task,
            replicas,
            changelog,
            consumer: None,
            kept: BTreeMap::new(),
            next_refresh: None,
            warned: false,
        }
    }

    /// Reads placement again at the next [`Standby::refresh`] (the group rebalanced).
    pub fn invalidate(&mut self) {
        self.next_refresh = None;
    }

    /// Follows placement: starts the copies this instance should now keep (from where a
    /// copy left off, or from the start after dropping what the partition held locally) and
    /// drops those it no longer keeps. `owned` are the partitions this instance processes.
    pub fn refresh(
        &mut self,
        source: &Source,
        store: &Store,
        owned: &BTreeSet<i32>,
    ) -> Result<(), PipelineError> {
        if self.next_refresh.is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        self.next_refresh = Some(Instant::now() + REFRESH);
        let members = match source.members() {
            Ok(Some(members)) => members,
            Ok(None) => return Ok(()), // rebalancing: read again at the next refresh
            Err(error) => {
                self.next_refresh = Some(Instant::now() + RETRY);
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(task = self.task, %error, "standby copies wait: the group's members could not be read (tried again every minute)");
                }
                return Ok(());
            }
        };
        let Some(wanted) = placement(&members, source.client_id(), self.replicas) else {
            if members
                .iter()
                .filter(|m| m.client_id == source.client_id())
                .count()
                > 1
                && !std::mem::replace(&mut self.warned, true)
            {
                tracing::warn!(task = self.task, client_id = source.client_id(), "standby replicas are off: several members share this client.id; give each instance its own");
            }
            return Ok(());
        };
        let wanted: BTreeSet<i32> = wanted.difference(owned).copied().collect();
        let current: BTreeSet<i32> = self.kept.keys().copied().collect();
        if wanted == current {
            return Ok(());
        }
        let stores: Vec<&str> = self.changelog.topics().iter().map(|(s, _)| *s).collect();
        let mut batch = Batch::default();
        for &p in current.difference(&wanted) {
            self.kept.remove(&p);
            store.stage_partition_clear(&mut batch, self.task, p, &stores);
            store.stage_standby_end(&mut batch, self.task, p);
        }
        for &p in wanted.difference(&current) {
            let offsets = match store.standby_offsets(self.task, p)? {
                Some(offsets) => offsets,
                None => {
                    // What the partition holds locally is not a copy: it starts afresh.
                    store.stage_partition_clear(&mut batch, self.task, p, &stores);
                    let offsets: Vec<_> = stores.iter().map(|&s| (s, 0)).collect();
                    store.stage_standby_offsets(&mut batch, self.task, p, &offsets);
                    offsets
                }
            };
            self.kept.insert(p, offsets);
        }
        store.commit(batch)?;
        self.assign()?;
        metrics::standby_partitions(self.task, self.kept.len());
        tracing::info!(task = self.task, standby = ?self.kept.keys().collect::<Vec<_>>(), "standby copies follow placement");
        Ok(())
    }

    /// Stops keeping copies of `partitions` (now assigned here): what was applied is already
    /// stored with its offsets, from which the restore goes on.
    pub fn promote(&mut self, partitions: &[i32]) -> Result<(), PipelineError> {
        let before = self.kept.len();
        for p in partitions {
            self.kept.remove(p);
        }
        if self.kept.len() != before {
            self.assign()?;
            metrics::standby_partitions(self.task, self.kept.len());
        }
        Ok(())
    }

    /// Applies the changelog records that arrived for the copies, at most [`APPLY_MAX`].
    pub fn apply(&mut self, store: &Store) -> Result<(), PipelineError> {
        let Some(consumer) = &self.consumer else {
            return Ok(());
        };
        let topics = self.changelog.topics();
        let mut batch = Batch::default();
        let mut touched = BTreeSet::new();
        let mut applied = 0u64;
        while applied < APPLY_MAX as u64 {
            let message = match consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(KafkaError::PartitionEOF(_))) => continue,
                Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                    return Err(PipelineError::kafka(
                        "reading changelogs for standby copies",
                    )(e))
                }
                Some(Err(error)) => {
                    tracing::warn!(task = self.task, %error, "standby changelog read error; librdkafka retries");
                    break;
                }
            };
            let p = message.partition();
            let Some(&(s, _)) = topics.iter().find(|(_, t)| t == message.topic()) else {
                continue;
            };
            let Some(offsets) = self.kept.get_mut(&p) else {
                continue; // a record fetched before the partition was promoted or dropped
            };
            if let Some(key) = message.key() {
                store.stage_restored(&mut batch, s, key, message.payload());
            }
            for (store_name, next) in offsets.iter_mut() {
                if *store_name == s {
                    *next = message.offset() + 1;
                }
            }
            touched.insert(p);
            applied += 1;
        }
        if touched.is_empty() {
            return Ok(());
        }
        tracing::debug!(
            task = self.task,
            applied,
            partitions = touched.len(),
            "standby records applied"
        );
        for p in touched {
            store.stage_standby_offsets(&mut batch, self.task, p, &self.kept[&p]);
        }
        store.commit(batch)?;
        metrics::standby_applied(self.task, applied);
        Ok(())
    }

    /// Points the changelog consumer at the kept partitions, each from its stored offset.
    fn assign(&mut self) -> Result<(), PipelineError> {
        if self.consumer.is_none() {
            self.consumer = Some(self.changelog.reader()?);
        }
        let consumer = self.consumer.as_ref().expect("created above");
        let mut tpl = TopicPartitionList::new();
        for (p, offsets) in &self.kept {
            for (s, topic) in self.changelog.topics() {
                let next = offsets
                    .iter()
                    .find(|(store, _)| store == s)
                    .map_or(0, |(_, o)| *o);
                let offset = if next == 0 {
                    Offset::Beginning
                } else {
                    Offset::Offset(next)
                };
                tpl.add_partition_offset(topic, *p, offset)
                    .map_err(PipelineError::kafka("assigning a changelog partition"))?;
            }
        }
        consumer.assign(&tpl).map_err(PipelineError::kafka(
            "assigning the standby changelog partitions",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, partitions: &[i32]) -> Member {
        Member {
            client_id: id.into(),
            partitions: partitions.to_vec(),
        }
    }

    #[test]
    fn each_partition_has_its_copies_on_the_members_after_its_owner() {
        let group = [
            member("c", &[4, 5]),
            member("a", &[0, 1]),
            member("b", &[2, 3]),
        ];
        let kept = |me: &str, replicas| placement(&group, me, replicas).unwrap();
        assert_eq!(kept("b", 1), BTreeSet::from([0, 1]));
        assert_eq!(kept("c", 1), BTreeSet::from([2, 3]));
        assert_eq!(kept("a", 1), BTreeSet::from([4, 5]));
        assert_eq!(kept("a", 2), BTreeSet::from([2, 3, 4, 5]));
        // More replicas than other members: every other member's partitions, never its own.
        assert_eq!(kept("a", 5), BTreeSet::from([2, 3, 4, 5]));
        assert_eq!(kept("a", 0), BTreeSet::new());
    }

    #[test]
    fn no_placement_for_a_member_that_is_absent_or_not_alone_with_its_id() {
        let group = [member("a", &[0]), member("a", &[1]), member("b", &[2])];
        assert_eq!(placement(&group, "a", 1), None);
        assert_eq!(placement(&group, "z", 1), None);
        assert_eq!(placement(&group, "b", 1), Some(BTreeSet::from([1])));
    }
}
