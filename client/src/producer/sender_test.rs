//! The sender's state machine without a broker: sequences, request packing, retries in order,
//! definite failures, fencing and expiry. Answers are made up and handed to `handle`.

use std::collections::BTreeSet;
use std::sync::Mutex;

use futures::FutureExt;
use sluice_protocol::messages::{ProducePartitionResponse, ProduceTopicResponse};
use tokio::sync::{Notify, Semaphore, watch};

use super::*;
use crate::producer::accumulator::{Append, RecordParts, Target, TopicRef};
use crate::producer::{Delivery, DeliveryFuture, Progress};

const BUFFER_BYTES: usize = 1 << 20;

/// A `Shared` whose client reaches a listener that never answers: the state machine is driven
/// by hand, nothing is sent.
async fn shared() -> Arc<Shared> {
    let url = crate::test_support::silent_listener().await;
    let client = Client::connect(&url).await.unwrap();
    let mut accumulator =
        Accumulator::new(1_000, Duration::from_secs(60), Duration::from_secs(120));
    accumulator.set_partition_count("t", 2);
    Arc::new(Shared {
        client,
        spare_buffers: accumulator.spare_buffers(),
        accumulator: Mutex::new(accumulator),
        buffer: Semaphore::new(BUFFER_BYTES),
        buffer_bytes: BUFFER_BYTES,
        wake: Notify::new(),
        sender_waiting: std::sync::atomic::AtomicBool::new(false),
        progress: Progress {
            incomplete: Mutex::new(BTreeSet::new()),
            lowest_incomplete: watch::channel(u64::MAX).0,
        },
    })
}

fn options() -> SenderOptions {
    SenderOptions {
        acks: Acks::Durable,
        producer_name: Some("relay".into()),
        max_in_flight_per_partition: 5,
        request_timeout: Duration::from_secs(30),
        delivery_timeout: Duration::from_secs(120),
        max_request_bytes: 1 << 20,
        retry_initial_backoff: Duration::from_millis(10),
        retry_max_backoff: Duration::from_millis(100),
    }
}

/// Producer 7, epoch 3; partition 0 of "t" continues at sequence 100.
fn identity() -> Identity {
    Identity {
        producer_id: 7,
        producer_epoch: 3,
        sequences: HashMap::from([("t".to_owned(), HashMap::from([(0, 100)]))]),
    }
}

/// Puts a closed batch of `records` records into `partition`, returning their futures.
fn batch(shared: &Shared, partition: u32, records: usize, now: Instant) -> Vec<DeliveryFuture> {
    batch_to(shared, "t", partition, records, now)
}

/// [`batch`] into a partition of `topic`.
fn batch_to(
    shared: &Shared,
    topic: &str,
    partition: u32,
    records: usize,
    now: Instant,
) -> Vec<DeliveryFuture> {
    let mut accumulator = shared.lock_accumulator();
    let mut futures = Vec::new();
    for _ in 0..records {
        let record = RecordParts {
            timestamp_ms: 1_700_000_000_000,
            key: None,
            value: b"value",
            headers: &[],
        };
        let mut reserved = 1_000;
        shared.buffer.try_acquire_many(1_000).unwrap().forget();
        match accumulator
            .append(
                TopicRef::Name(topic),
                Target::Partition(partition),
                &record,
                &mut reserved,
                || now,
            )
            .unwrap()
        {
            Append::Appended {
                completion,
                index,
                batch,
                new_batch,
                ..
            } => {
                if new_batch {
                    shared.progress.started(batch);
                }
                futures.push(DeliveryFuture::new(Arc::clone(completion), index));
            }
            other => panic!("unexpected {other:?}"),
        }
        shared.release_buffer(reserved);
    }
    accumulator.seal_all();
    futures
}

/// (partition, base_sequence, record count) of each batch in a request.
fn contents(request: &PlannedRequest) -> Vec<(u32, u64, u32)> {
    request.request.topics[0]
        .partitions
        .iter()
        .map(|partition| {
            let batch = RecordBatch::new(partition.records.clone()).unwrap();
            let view = batch.view();
            assert_eq!((view.producer_id(), view.producer_epoch()), (7, 3));
            (
                partition.partition,
                view.base_sequence(),
                view.record_count(),
            )
        })
        .collect()
}

fn answer(request: PlannedRequest, results: &[(ErrorCode, u64)]) -> RequestResult {
    let partitions = request
        .entries
        .iter()
        .zip(results)
        .map(
            |((_, partition, _), (error_code, base_offset))| ProducePartitionResponse {
                partition: *partition,
                error_code: *error_code,
                base_offset: *base_offset,
                log_start_offset: 0,
                error_message: None,
            },
        )
        .collect();
    let response = ProduceResponse {
        topics: vec![ProduceTopicResponse {
            name: "t".into(),
            partitions,
        }],
    };
    (request, Ok(Some(response)))
}

fn plan(state: &mut SenderState, shared: &Shared, now: Instant) -> Vec<PlannedRequest> {
    let drained = state.drain(&mut shared.lock_accumulator(), now);
    state.plan(drained, now)
}

fn offsets(futures: Vec<DeliveryFuture>) -> Vec<Option<u64>> {
    futures
        .into_iter()
        .map(|future| {
            future
                .now_or_never()
                .expect("resolved")
                .expect("delivered")
                .offset
        })
        .collect()
}

#[tokio::test]
async fn sequences_continue_per_partition_and_requests_take_one_batch_per_partition() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let first = batch(&shared, 0, 3, now);
    let second = batch(&shared, 0, 2, now);
    let other = batch(&shared, 1, 1, now);
    let mut requests = plan(&mut state, &shared, now);
    assert_eq!(requests.len(), 2, "two rounds: partition 0 has two batches");
    assert_eq!(contents(&requests[0]), [(0, 100, 3), (1, 0, 1)]);
    assert_eq!(contents(&requests[1]), [(0, 103, 2)]);
    assert!(
        plan(&mut state, &shared, now).is_empty(),
        "nothing new to send"
    );
    // Answers may overtake each other; each batch gets its own offsets.
    let second_request = requests.pop().unwrap();
    state.handle(
        &shared,
        answer(second_request, &[(ErrorCode::None, 3)]),
        now,
    );
    let first_request = requests.pop().unwrap();
    state.handle(
        &shared,
        answer(
            first_request,
            &[(ErrorCode::None, 0), (ErrorCode::DuplicateSequence, 40)],
        ),
        now,
    );
    assert_eq!(offsets(first), [Some(0), Some(1), Some(2)]);
    assert_eq!(offsets(second), [Some(3), Some(4)]);
    assert_eq!(offsets(other), [Some(40)], "a duplicate's original offset");
    assert!(state.is_idle());
    assert_eq!(
        shared.buffer.available_permits(),
        BUFFER_BYTES,
        "buffer given back"
    );
}

#[tokio::test]
async fn a_retriable_failure_resends_the_partition_in_order_with_the_same_sequences() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let first = batch(&shared, 0, 2, now);
    let second = batch(&shared, 0, 2, now);
    let mut requests = plan(&mut state, &shared, now);
    let second_request = requests.pop().unwrap();
    let first_request = requests.pop().unwrap();
    let first_bytes = first_request.request.topics[0].partitions[0]
        .records
        .clone();
    state.handle(
        &shared,
        answer(first_request, &[(ErrorCode::RequestTimedOut, 0)]),
        now,
    );
    // The gap behind the failed batch is part of the same retry, not fatal.
    state.handle(
        &shared,
        answer(second_request, &[(ErrorCode::OutOfOrderSequence, 0)]),
        now,
    );
    assert!(state.take_new_fatal().is_none());
    let third = batch(&shared, 0, 1, now);
    let retry_at = state.next_deadline().expect("a resend is due");
    assert!(retry_at <= now + Duration::from_millis(10));
    if retry_at > now {
        assert!(
            plan(&mut state, &shared, now).is_empty(),
            "not before the backoff is over"
        );
    }
    let resent = plan(&mut state, &shared, retry_at);
    assert_eq!(resent.len(), 2, "both batches again, not the new one");
    assert_eq!(contents(&resent[0]), [(0, 100, 2)]);
    assert_eq!(contents(&resent[1]), [(0, 102, 2)]);
    assert_eq!(
        resent[0].request.topics[0].partitions[0].records, first_bytes,
        "same bytes"
    );
    let mut resent = resent.into_iter();
    state.handle(
        &shared,
        answer(resent.next().unwrap(), &[(ErrorCode::None, 10)]),
        retry_at,
    );
    state.handle(
        &shared,
        answer(resent.next().unwrap(), &[(ErrorCode::None, 12)]),
        retry_at,
    );
    assert_eq!(offsets(first), [Some(10), Some(11)]);
    assert_eq!(offsets(second), [Some(12), Some(13)]);
    // The window is clean again: the waiting batch goes out with the next sequence.
    let requests = plan(&mut state, &shared, retry_at);
    assert_eq!(contents(&requests[0]), [(0, 104, 1)]);
    drop(third);
}

#[tokio::test]
async fn a_definite_failure_fails_the_later_batches_and_rewinds_the_sequence() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let first = batch(&shared, 0, 2, now);
    let second = batch(&shared, 0, 2, now);
    let mut requests = plan(&mut state, &shared, now).into_iter();
    let (first_request, second_request) = (requests.next().unwrap(), requests.next().unwrap());
    state.handle(
        &shared,
        answer(first_request, &[(ErrorCode::MessageTooLarge, 0)]),
        now,
    );
    let failed = first.into_iter().next().unwrap().now_or_never().unwrap();
    assert!(matches!(
        failed,
        Err(Error::Broker {
            code: ErrorCode::MessageTooLarge,
            ..
        })
    ));
    // Nothing new goes out while the later batch, built on the failed one's sequences, is out.
    let waiting = batch(&shared, 0, 1, now);
    assert!(plan(&mut state, &shared, now).is_empty());
    state.handle(
        &shared,
        answer(second_request, &[(ErrorCode::OutOfOrderSequence, 0)]),
        now,
    );
    assert!(
        state.take_new_fatal().is_none(),
        "a gap explained by the failure is not fatal"
    );
    match second.into_iter().next().unwrap().now_or_never().unwrap() {
        Err(Error::Broker {
            code: ErrorCode::MessageTooLarge,
            message: Some(message),
        }) => assert!(message.contains("earlier batch"), "{message}"),
        other => panic!("expected the earlier batch's error, got {other:?}"),
    }
    let requests = plan(&mut state, &shared, now);
    assert_eq!(
        contents(&requests[0]),
        [(0, 100, 1)],
        "continues where the failed batch began"
    );
    drop(waiting);
}

#[tokio::test]
async fn fencing_is_fatal() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let first = batch(&shared, 0, 1, now);
    let second = batch(&shared, 1, 1, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    state.handle(
        &shared,
        answer(
            request,
            &[(ErrorCode::ProducerFenced, 0), (ErrorCode::None, 5)],
        ),
        now,
    );
    let fatal = state.take_new_fatal().expect("fatal");
    assert!(state.take_new_fatal().is_none(), "reported once");
    let message = fatal.to_string();
    assert!(
        message.contains("\"relay\"") && message.contains("fenced"),
        "{message}"
    );
    state.fail_all(&shared, &fatal);
    assert!(matches!(
        first.into_iter().next().unwrap().now_or_never().unwrap(),
        Err(Error::Broker {
            code: ErrorCode::ProducerFenced,
            ..
        })
    ));
    assert!(matches!(
        second.into_iter().next().unwrap().now_or_never().unwrap(),
        Ok(Delivery {
            offset: Some(5),
            ..
        })
    ));
    assert!(plan(&mut state, &shared, now).is_empty());
}

#[tokio::test]
async fn a_batch_retried_past_its_delivery_timeout_fails_and_a_new_epoch_is_due() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let futures = batch(&shared, 0, 1, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    state.handle(&shared, (request, Err(Error::ConnectionClosed)), now);
    let expiry = now + options().delivery_timeout;
    state.expire(&shared, expiry - Duration::from_millis(1));
    assert!(!state.epoch_bump_due(expiry));
    state.expire(&shared, expiry);
    match futures.into_iter().next().unwrap().now_or_never().unwrap() {
        Err(Error::RetriesExhausted { attempts: 1, last }) => {
            assert!(matches!(*last, Error::ConnectionClosed));
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    assert!(
        state.epoch_bump_due(expiry),
        "the outcome is unknown: a new epoch first"
    );
    let _waiting = batch(&shared, 0, 1, expiry);
    assert!(
        plan(&mut state, &shared, expiry).is_empty(),
        "nothing new before the new epoch"
    );
}

#[tokio::test]
async fn without_idempotence_batches_carry_no_producer() {
    let shared = shared().await;
    let now = Instant::now();
    let mut options = options();
    options.producer_name = None;
    let mut state = SenderState::new(options, None);
    let futures = batch(&shared, 0, 2, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    let batch = RecordBatch::new(request.request.topics[0].partitions[0].records.clone()).unwrap();
    assert!(!batch.view().has_producer_id());
    state.handle(&shared, answer(request, &[(ErrorCode::None, 7)]), now);
    assert_eq!(offsets(futures), [Some(7), Some(8)]);
}

#[tokio::test]
async fn unknown_producer_id_behind_a_retried_first_batch_is_part_of_the_retry() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let first = batch(&shared, 0, 2, now);
    let second = batch(&shared, 0, 2, now);
    let mut requests = plan(&mut state, &shared, now).into_iter();
    let (first_request, second_request) = (requests.next().unwrap(), requests.next().unwrap());
    // The first batch never reached the broker; the second did, and the broker, holding no
    // state for this producer there, cannot tell its sequence from a gap.
    state.handle(&shared, (first_request, Err(Error::ConnectionClosed)), now);
    state.handle(
        &shared,
        answer(second_request, &[(ErrorCode::UnknownProducerId, 0)]),
        now,
    );
    assert!(state.take_new_fatal().is_none());
    let retry_at = state.next_deadline().expect("a resend is due");
    let mut resent = plan(&mut state, &shared, retry_at).into_iter();
    let (again_first, again_second) = (resent.next().unwrap(), resent.next().unwrap());
    assert_eq!(contents(&again_first), [(0, 100, 2)]);
    assert_eq!(contents(&again_second), [(0, 102, 2)]);
    state.handle(
        &shared,
        answer(again_first, &[(ErrorCode::None, 0)]),
        retry_at,
    );
    state.handle(
        &shared,
        answer(again_second, &[(ErrorCode::None, 2)]),
        retry_at,
    );
    assert_eq!(offsets(first), [Some(0), Some(1)]);
    assert_eq!(offsets(second), [Some(2), Some(3)]);
}

#[tokio::test]
async fn unknown_producer_id_with_nothing_before_it_fails_the_batch_and_takes_a_new_epoch() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let futures = batch(&shared, 0, 1, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    // Everything before was acknowledged, yet the broker holds no state for the producer
    // there: retention deleted it, or it expired.
    state.handle(
        &shared,
        answer(request, &[(ErrorCode::UnknownProducerId, 0)]),
        now,
    );
    assert!(state.take_new_fatal().is_none(), "the producer goes on");
    assert!(matches!(
        futures.into_iter().next().unwrap().now_or_never().unwrap(),
        Err(Error::Broker {
            code: ErrorCode::UnknownProducerId,
            ..
        })
    ));
    assert!(
        state.epoch_bump_due(now),
        "sequences start again under a new epoch"
    );
}

#[tokio::test]
async fn out_of_order_sequence_with_nothing_before_it_is_fatal() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let _futures = batch(&shared, 0, 1, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    state.handle(
        &shared,
        answer(request, &[(ErrorCode::OutOfOrderSequence, 0)]),
        now,
    );
    assert!(state.take_new_fatal().is_some());
}

#[tokio::test]
async fn a_storage_error_may_have_been_written_so_a_new_epoch_follows_not_a_rewind() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let first = batch(&shared, 0, 2, now);
    let second = batch(&shared, 0, 2, now);
    let mut requests = plan(&mut state, &shared, now).into_iter();
    let (first_request, second_request) = (requests.next().unwrap(), requests.next().unwrap());
    // Appended, then its fsync failed: the broker answers with a storage error, and the batch
    // may be in the log after a restart with its sequences.
    state.handle(
        &shared,
        answer(first_request, &[(ErrorCode::StorageError, 0)]),
        now,
    );
    assert!(matches!(
        first.into_iter().next().unwrap().now_or_never().unwrap(),
        Err(Error::Broker {
            code: ErrorCode::StorageError,
            ..
        })
    ));
    assert!(state.take_new_fatal().is_none());
    assert!(!state.epoch_bump_due(now), "not while a batch is still out");
    state.handle(
        &shared,
        answer(second_request, &[(ErrorCode::StorageError, 0)]),
        now,
    );
    assert!(
        second
            .into_iter()
            .next()
            .unwrap()
            .now_or_never()
            .unwrap()
            .is_err()
    );
    assert!(
        state.epoch_bump_due(now),
        "the sequences may be taken: a new epoch, not a rewind"
    );
    let _waiting = batch(&shared, 0, 1, now);
    assert!(
        plan(&mut state, &shared, now).is_empty(),
        "nothing new before the new epoch"
    );
}

#[tokio::test]
async fn no_more_batches_follow_the_oldest_unacknowledged_one_than_the_broker_remembers() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let mut futures: Vec<Vec<DeliveryFuture>> = (0..6).map(|_| batch(&shared, 0, 1, now)).collect();
    let mut requests = plan(&mut state, &shared, now).into_iter();
    let oldest = requests.next().unwrap();
    // The other four are answered first: the oldest is still out, perhaps written.
    for (index, request) in requests.enumerate() {
        state.handle(
            &shared,
            answer(request, &[(ErrorCode::None, 1 + index as u64)]),
            now,
        );
    }
    // The broker keeps the last five batches it wrote: a sixth after the oldest would push it
    // out, and its resend would then be refused as out of order.
    assert!(plan(&mut state, &shared, now).is_empty());
    state.handle(&shared, answer(oldest, &[(ErrorCode::None, 0)]), now);
    let requests = plan(&mut state, &shared, now);
    assert_eq!(contents(&requests[0]), [(0, 105, 1)]);
    let sixth = futures.pop().unwrap();
    assert_eq!(
        offsets(futures.into_iter().flatten().collect()),
        [Some(0), Some(1), Some(2), Some(3), Some(4)]
    );
    drop(sixth);
}

/// A new epoch that cannot be had while the broker is away past the client's retry deadline
/// is tried again later: the outage is not fatal to the producer.
#[tokio::test]
async fn a_new_epoch_not_had_within_the_retry_deadline_is_tried_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let broker = sluice_broker::Broker::start(sluice_broker::Config::on_loopback(dir.path()))
        .await
        .unwrap();
    let client_options = crate::ClientOptions::default().retry_deadline(Duration::from_millis(300));
    let client = Client::connect_with(&format!("tcp://{}", broker.tcp_addr), client_options)
        .await
        .unwrap();
    let held = init_producer_id(&client, Some("relay"), None)
        .await
        .unwrap();
    // The broker goes away: every attempt is refused until the retry deadline gives up.
    broker.shutdown().await;
    let mut state = SenderState::new(options(), Some(held));
    state.epoch_bump_needed = true;
    state.bump_epoch(&client).await;
    assert!(state.take_new_fatal().is_none(), "an outage is not fatal");
    assert!(state.epoch_bump_needed);
    assert!(state.epoch_bump_at.is_some(), "tried again later");
}

#[tokio::test]
async fn a_new_epoch_for_a_name_taken_over_by_a_newer_instance_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = sluice_broker::Broker::start(sluice_broker::Config::on_loopback(dir.path()))
        .await
        .unwrap();
    let client = Client::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    let older = init_producer_id(&client, Some("relay"), None)
        .await
        .unwrap();
    // Its batches' outcome became unknown (say, cut off from the broker) while a newer instance
    // of the same name started.
    let newer = init_producer_id(&client, Some("relay"), None)
        .await
        .unwrap();
    let older_epoch = older.producer_epoch;
    assert_eq!(newer.producer_epoch, older_epoch + 1);
    let mut state = SenderState::new(options(), Some(older));
    state.bump_epoch(&client).await;
    let fatal = state
        .take_new_fatal()
        .expect("the older instance is fenced");
    assert!(
        matches!(
            *fatal,
            Error::Broker {
                code: ErrorCode::ProducerFenced,
                ..
            }
        ),
        "{fatal:?}"
    );
    // The newer instance keeps the name: its own new epoch is granted.
    let mut state = SenderState::new(options(), Some(newer));
    state.bump_epoch(&client).await;
    assert!(state.take_new_fatal().is_none());
    let bumped = state.identity.as_ref().unwrap();
    assert_eq!(bumped.producer_epoch, older_epoch + 2);
    drop(client);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_partition_refusing_writes_fails_the_batch_and_frees_its_sequences() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let refused = batch(&shared, 0, 2, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    assert_eq!(contents(&request), [(0, 100, 2)]);
    state.handle(
        &shared,
        answer(request, &[(ErrorCode::PartitionReadOnly, 0)]),
        now,
    );
    assert!(matches!(
        refused.into_iter().next().unwrap().now_or_never().unwrap(),
        Err(Error::Broker {
            code: ErrorCode::PartitionReadOnly,
            ..
        })
    ));
    assert!(state.take_new_fatal().is_none());
    assert!(
        !state.epoch_bump_due(now),
        "nothing was written: no new epoch"
    );
    let _next = batch(&shared, 0, 1, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    assert_eq!(contents(&request), [(0, 100, 1)], "the sequence is reused");
}

#[tokio::test]
async fn a_refused_resend_may_follow_a_written_first_send_so_a_new_epoch_follows() {
    // A partition refusing writes, or a broker restarted with a lower batch limit or without
    // the topic: the refusal is of the resend, not of the first send.
    for code in [
        ErrorCode::PartitionReadOnly,
        ErrorCode::MessageTooLarge,
        ErrorCode::UnknownTopic,
    ] {
        let shared = shared().await;
        let now = Instant::now();
        let mut state = SenderState::new(options(), Some(identity()));
        let _futures = batch(&shared, 0, 1, now);
        let request = plan(&mut state, &shared, now).pop().unwrap();
        // The first send's answer is lost: it may have been written before the refusals began.
        state.handle(&shared, (request, Err(Error::ConnectionClosed)), now);
        let retry_at = state.next_deadline().expect("a resend is due");
        let request = plan(&mut state, &shared, retry_at).pop().unwrap();
        state.handle(&shared, answer(request, &[(code, 0)]), retry_at);
        assert!(state.take_new_fatal().is_none(), "{code}");
        assert!(
            state.epoch_bump_due(retry_at),
            "{code}: its sequences may be taken"
        );
    }
}

/// An answer that did not decode came from a broker that handled the request: the batch may
/// be written, so its sequences are not used again (the broker would answer the next batch
/// with this one's offsets, as a retry of it) and a new epoch follows.
#[tokio::test]
async fn an_answer_that_did_not_decode_leaves_the_outcome_unknown() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let futures = batch(&shared, 0, 1, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    let undecodable = Error::Protocol(WireError::Truncated {
        what: "produce response",
        needed: 4,
    });
    state.handle(&shared, (request, Err(undecodable)), now);
    assert!(matches!(
        futures.into_iter().next().unwrap().now_or_never().unwrap(),
        Err(Error::Protocol(_))
    ));
    assert!(state.take_new_fatal().is_none());
    assert!(state.epoch_bump_due(now), "a new epoch, not a rewind");
    let _waiting = batch(&shared, 0, 1, now);
    assert!(
        plan(&mut state, &shared, now).is_empty(),
        "nothing new before the new epoch"
    );
}

/// However the batches of many topics fill a request, its frame stays within
/// `max_request_bytes`: each topic's name, and its name's length and partition count, are
/// counted once per request.
#[tokio::test]
async fn requests_of_many_topics_stay_within_the_request_limit() {
    let topics: Vec<String> = (0..20).map(|index| format!("topic-{index}")).collect();
    for max_request_bytes in (300..2_400).step_by(7) {
        let shared = shared().await;
        let now = Instant::now();
        for topic in &topics {
            shared.lock_accumulator().set_partition_count(topic, 2);
        }
        let mut state = SenderState::new(
            SenderOptions {
                max_request_bytes,
                ..options()
            },
            None,
        );
        let mut futures = Vec::new();
        // One batch to each topic but the first, which has two: a topic's name and counts
        // weigh most against its batches where it has one.
        for topic in &topics {
            futures.extend(batch_to(&shared, topic, 0, 1, now));
        }
        futures.extend(batch_to(&shared, &topics[0], 1, 1, now));
        let requests = plan(&mut state, &shared, now);
        let batches: usize = requests.iter().map(|request| request.entries.len()).sum();
        assert_eq!(batches, topics.len() + 1, "every batch planned");
        for request in &requests {
            let mut frame = bytes::BytesMut::new();
            sluice_protocol::Request::Produce(request.request.clone()).encode_frame(1, &mut frame);
            assert!(
                frame.len() <= max_request_bytes,
                "a frame of {} bytes for a limit of {max_request_bytes}",
                frame.len()
            );
        }
    }
}

/// A base offset that leaves no room for the batch's records fails the batch as an answer
/// that makes no sense (its outcome unknown), instead of overflowing the records' offsets.
#[tokio::test]
async fn a_base_offset_with_no_room_for_the_records_fails_the_batch() {
    let shared = shared().await;
    let now = Instant::now();
    let mut state = SenderState::new(options(), Some(identity()));
    let futures = batch(&shared, 0, 2, now);
    let request = plan(&mut state, &shared, now).pop().unwrap();
    state.handle(
        &shared,
        answer(request, &[(ErrorCode::None, u64::MAX - 1)]),
        now,
    );
    for future in futures {
        assert!(matches!(
            future.now_or_never().unwrap(),
            Err(Error::Protocol(_))
        ));
    }
    assert!(state.take_new_fatal().is_none());
    assert!(state.epoch_bump_due(now), "it may have been written");
}
