//! The group member: a state machine without IO that turns heartbeat responses into actions.
//! The consumer's heartbeat task drives it.
//!
//! ```text
//! join (member_id "", epoch 0) ─▶ member id, epoch ─▶ heartbeat every interval, reporting owned
//! response.assignment − owned ─▶ Assign   (look up committed offsets, start fetching)
//! response.release           ─▶ Release  (stop delivering, commit processed positions, drop)
//! UnknownMember / Fenced      ─▶ Rejoin   (drop everything WITHOUT committing: a fenced
//!                                          member's commits would be refused anyway)
//! no heartbeat accepted for a ─▶ Rejoin   (the broker has expired the member by now: its
//! whole session timeout                    partitions are someone else's)
//! ```

use std::collections::BTreeSet;

use sluice_protocol::ErrorCode;
use sluice_protocol::messages::{
    ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse, TopicPartitions,
};

/// A topic and a partition.
pub type TopicPartition = (String, u32);

/// What the consumer must do after a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberAction {
    /// Start consuming these (from their committed offsets).
    Assign(BTreeSet<TopicPartition>),
    /// Commit what was processed of these, then stop and report them gone.
    Release(BTreeSet<TopicPartition>),
    /// The broker no longer knows this member: everything owned is lost; join again.
    Rejoin(BTreeSet<TopicPartition>),
}

/// One member's view of its group.
#[derive(Clone, Debug)]
pub struct MemberState {
    pub group_id: String,
    pub member_id: String,
    pub member_epoch: u32,
    pub topics: Vec<String>,
    pub session_timeout_ms: u32,
    pub assignor: Option<String>,
    /// Partitions this member holds.
    pub owned: BTreeSet<TopicPartition>,
    pub heartbeat_interval_ms: u32,
}

impl MemberState {
    pub fn new(
        group_id: &str,
        topics: Vec<String>,
        session_timeout_ms: u32,
        assignor: Option<String>,
    ) -> Self {
        MemberState {
            group_id: group_id.to_owned(),
            member_id: String::new(),
            member_epoch: 0,
            topics,
            session_timeout_ms,
            assignor,
            owned: BTreeSet::new(),
            heartbeat_interval_ms: 1000,
        }
    }

    pub fn is_joined(&self) -> bool {
        !self.member_id.is_empty()
    }

    /// The next heartbeat: a join while not a member, else a report of what is owned.
    pub fn heartbeat_request(&self) -> ConsumerGroupHeartbeatRequest {
        ConsumerGroupHeartbeatRequest {
            group_id: self.group_id.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.member_epoch,
            session_timeout_ms: self.session_timeout_ms,
            assignor: self.assignor.clone(),
            topics: Some(self.topics.clone()),
            owned: Some(TopicPartitions::group(&self.owned)),
        }
    }

    /// Applies a heartbeat response.
    ///
    /// # Errors
    /// A broker error other than the membership ones (which become `Rejoin`): the caller
    /// retries the heartbeat later.
    pub fn on_heartbeat(
        &mut self,
        response: &ConsumerGroupHeartbeatResponse,
    ) -> Result<Vec<MemberAction>, ErrorCode> {
        match response.error_code {
            ErrorCode::None => {}
            ErrorCode::UnknownMember | ErrorCode::FencedMemberEpoch => {
                return Ok(vec![self.leave_unheard()]);
            }
            code => return Err(code),
        }
        self.member_id = response.member_id.clone();
        self.member_epoch = response.member_epoch;
        if response.heartbeat_interval_ms > 0 {
            self.heartbeat_interval_ms = response.heartbeat_interval_ms;
        }
        let mut actions = Vec::new();
        let release: BTreeSet<TopicPartition> = TopicPartitions::flatten(&response.release)
            .intersection(&self.owned)
            .cloned()
            .collect();
        if !release.is_empty() {
            actions.push(MemberAction::Release(release));
        }
        let assign: BTreeSet<TopicPartition> = TopicPartitions::flatten(&response.assignment)
            .difference(&self.owned)
            .cloned()
            .collect();
        if !assign.is_empty() {
            self.owned.extend(assign.iter().cloned());
            actions.push(MemberAction::Assign(assign));
        }
        Ok(actions)
    }

    /// No heartbeat was accepted for a whole session timeout: the broker has expired this
    /// member, and its partitions may be another's by now. Everything owned is lost, as when
    /// the broker says the member is unknown. `None` when not a member (nothing to lose).
    pub fn session_lost(&mut self) -> Option<MemberAction> {
        (!self.member_id.is_empty() || !self.owned.is_empty()).then(|| self.leave_unheard())
    }

    fn leave_unheard(&mut self) -> MemberAction {
        let lost = std::mem::take(&mut self.owned);
        self.member_id.clear();
        self.member_epoch = 0;
        MemberAction::Rejoin(lost)
    }

    /// The consumer finished releasing these (committed and stopped).
    pub fn released(&mut self, partitions: &BTreeSet<TopicPartition>) {
        for partition in partitions {
            self.owned.remove(partition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(partition: u32) -> TopicPartition {
        ("t".to_owned(), partition)
    }

    fn response(assignment: &[u32], release: &[u32]) -> ConsumerGroupHeartbeatResponse {
        ConsumerGroupHeartbeatResponse {
            member_id: "m-1".into(),
            member_epoch: 3,
            group_epoch: 3,
            heartbeat_interval_ms: 500,
            assignment: if assignment.is_empty() {
                vec![]
            } else {
                vec![TopicPartitions {
                    topic: "t".into(),
                    partitions: assignment.to_vec(),
                }]
            },
            release: if release.is_empty() {
                vec![]
            } else {
                vec![TopicPartitions {
                    topic: "t".into(),
                    partitions: release.to_vec(),
                }]
            },
            ..Default::default()
        }
    }

    #[test]
    fn join_assign_release_and_report() {
        let mut member = MemberState::new("g", vec!["t".into()], 10_000, None);
        let join = member.heartbeat_request();
        assert!(join.member_id.is_empty() && join.member_epoch == 0);
        let actions = member.on_heartbeat(&response(&[0, 1, 2], &[])).unwrap();
        assert_eq!(
            actions,
            [MemberAction::Assign([tp(0), tp(1), tp(2)].into())]
        );
        assert_eq!(member.member_id, "m-1");
        assert_eq!(member.heartbeat_interval_ms, 500);
        // Nothing new: no actions.
        assert!(
            member
                .on_heartbeat(&response(&[0, 1, 2], &[]))
                .unwrap()
                .is_empty()
        );
        let actions = member.on_heartbeat(&response(&[0], &[1, 2])).unwrap();
        assert_eq!(actions, [MemberAction::Release([tp(1), tp(2)].into())]);
        // Until released, they are still reported as owned.
        assert_eq!(
            member.heartbeat_request().owned.unwrap()[0].partitions,
            [0, 1, 2]
        );
        member.released(&[tp(1), tp(2)].into());
        assert_eq!(member.heartbeat_request().owned.unwrap()[0].partitions, [0]);
    }

    #[test]
    fn a_lost_session_drops_everything_and_rejoins_once() {
        let mut member = MemberState::new("g", vec!["t".into()], 10_000, None);
        assert_eq!(member.session_lost(), None, "not a member yet");
        member.on_heartbeat(&response(&[0, 1], &[])).unwrap();
        assert_eq!(
            member.session_lost(),
            Some(MemberAction::Rejoin([tp(0), tp(1)].into()))
        );
        assert!(!member.is_joined());
        assert_eq!(member.heartbeat_request().member_epoch, 0, "joins again");
        assert_eq!(member.session_lost(), None, "nothing more to lose");
    }

    #[test]
    fn fenced_member_drops_everything_and_rejoins() {
        let mut member = MemberState::new("g", vec!["t".into()], 10_000, None);
        member.on_heartbeat(&response(&[0, 1], &[])).unwrap();
        let fenced = ConsumerGroupHeartbeatResponse {
            error_code: ErrorCode::UnknownMember,
            ..Default::default()
        };
        let actions = member.on_heartbeat(&fenced).unwrap();
        assert_eq!(actions, [MemberAction::Rejoin([tp(0), tp(1)].into())]);
        assert!(!member.is_joined());
        assert!(member.owned.is_empty());
        let other = ConsumerGroupHeartbeatResponse {
            error_code: ErrorCode::RebalanceInProgress,
            ..Default::default()
        };
        assert_eq!(
            member.on_heartbeat(&other),
            Err(ErrorCode::RebalanceInProgress)
        );
    }
}
