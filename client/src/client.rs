//! [`Client`]: the entry point. It bootstraps from one or more broker URLs, keeps one
//! multiplexed [`Connection`] per broker, reconnects with exponential backoff and jitter, and
//! guards each broker with a circuit breaker so calls fail fast while it is down.
//!
//! ```no_run
//! # async fn example() -> sluice_client::error::Result<()> {
//! let client = sluice_client::Client::connect("tcp://127.0.0.1:7171").await?;
//! let response = client.send(sluice_client::protocol::messages::ListTopicsRequest {}).await?;
//! # Ok(()) }
//! ```

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_protocol::{Request, Response};

use crate::connection::{Connection, ConnectionOptions, PendingResponse};
use crate::error::{Error, Result};
use crate::resilience::{Backoff, BreakerOptions, BreakerState, CircuitBreaker};

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Settings of each connection (timeouts, frame size, CA file for quic://).
    pub connection: ConnectionOptions,
    /// First retry delay. Default = 50 ms.
    pub retry_initial_backoff: Duration,
    /// Largest retry delay. Default = 2 s.
    pub retry_max_backoff: Duration,
    /// How long [`Client::send_with_retry`] keeps retrying retriable errors. Default = 30 s.
    pub retry_deadline: Duration,
    /// Circuit breaker per broker connection.
    pub breaker: BreakerOptions,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connection: ConnectionOptions::default(),
            retry_initial_backoff: Duration::from_millis(50),
            retry_max_backoff: Duration::from_secs(2),
            retry_deadline: Duration::from_secs(30),
            breaker: BreakerOptions::default(),
        }
    }
}

impl ClientOptions {
    /// Default = [`ConnectionOptions::default`].
    pub fn connection(mut self, connection: ConnectionOptions) -> Self {
        self.connection = connection;
        self
    }

    /// Default = 30 s.
    pub fn retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// Default = 5 consecutive failures, open for 5 s.
    pub fn breaker(mut self, breaker: BreakerOptions) -> Self {
        self.breaker = breaker;
        self
    }
}

#[derive(Debug)]
struct Inner {
    urls: Vec<String>,
    options: ClientOptions,
    /// The live connection, if any, and which URL it went to.
    current: tokio::sync::Mutex<Option<Connection>>,
    breaker: Mutex<CircuitBreaker>,
    next_url: Mutex<usize>,
    /// The last connection whose breaking was counted as a failure: the calls in flight on one
    /// connection that breaks all fail together, and count once.
    broken_counted: Mutex<Option<usize>>,
    /// Connection attempts made so far, and how the last one failed (if it did): a call that
    /// waited for another's attempt takes its outcome instead of making one more.
    attempts: std::sync::atomic::AtomicU64,
    last_failure: Mutex<Option<(String, io::ErrorKind, String)>>,
}

/// A handle to a Sluice cluster (today: one broker). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the first reachable of `urls` (comma-separated `tcp://` / `quic://`).
    pub async fn connect(urls: &str) -> Result<Client> {
        Self::connect_with(urls, ClientOptions::default()).await
    }

    /// Like [`Client::connect`] with options.
    ///
    /// # Errors
    /// `InvalidUrl` for an empty list; otherwise the last connection error.
    pub async fn connect_with(urls: &str, options: ClientOptions) -> Result<Client> {
        let urls: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(Error::InvalidUrl("no broker URL given".into()));
        }
        let client = Client {
            inner: Arc::new(Inner {
                breaker: Mutex::new(CircuitBreaker::new(options.breaker)),
                urls,
                options,
                current: tokio::sync::Mutex::new(None),
                next_url: Mutex::new(0),
                broken_counted: Mutex::new(None),
                attempts: std::sync::atomic::AtomicU64::new(0),
                last_failure: Mutex::new(None),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The broker URLs this client bootstraps from.
    pub fn urls(&self) -> &[String] {
        &self.inner.urls
    }

    /// The circuit breaker's state, for monitoring and tests.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner
            .breaker
            .lock()
            .expect("breaker lock poisoned")
            .state()
    }

    /// The live connection, connecting (once, through the breaker) when there is none.
    ///
    /// # Errors
    /// `CircuitOpen` while the breaker is open; the connection error otherwise.
    pub async fn connection(&self) -> Result<Connection> {
        use std::sync::atomic::Ordering;
        let attempts_before = self.inner.attempts.load(Ordering::Acquire);
        let mut current = self.inner.current.lock().await;
        if let Some(connection) = current
            .as_ref()
            .filter(|connection| !connection.is_closed())
        {
            let breaker = self
                .inner
                .breaker
                .lock()
                .expect("breaker lock poisoned")
                .state();
            if matches!(breaker, BreakerState::Closed { .. }) {
                return Ok(connection.clone());
            }
            // The breaker opened while this connection stayed up (a broker that takes
            // requests and answers none): stop using it, and connect again through the
            // breaker like any new connection, failing fast while it is open.
            *current = None;
        }
        // Another call's attempt ended while this one waited for it, and failed: its outcome is
        // this call's too. Making one more each would take k connect timeouts for the k-th
        // caller, far past its request timeout, against a broker that is down.
        if self.inner.attempts.load(Ordering::Acquire) != attempts_before
            && let Some((address, kind, message)) = self
                .inner
                .last_failure
                .lock()
                .expect("attempt lock poisoned")
                .clone()
        {
            return Err(Error::Connect {
                address,
                source: io::Error::new(kind, message),
            });
        }
        let outcome = self.connect_once(&mut current).await;
        let failure = match &outcome {
            Err(Error::Connect { address, source }) => {
                Some((address.clone(), source.kind(), source.to_string()))
            }
            _ => None,
        };
        *self
            .inner
            .last_failure
            .lock()
            .expect("attempt lock poisoned") = failure;
        self.inner.attempts.fetch_add(1, Ordering::Release);
        outcome
    }

    /// One round of connection attempts, under the `current` lock, through the breaker.
    async fn connect_once(&self, current: &mut Option<Connection>) -> Result<Connection> {
        // Each URL once, starting where the last attempt left off: the first that connects is
        // the connection, else the last error.
        let mut last_error = None;
        for _ in 0..self.inner.urls.len() {
            let url = {
                let mut next = self.inner.next_url.lock().expect("url lock poisoned");
                let url = self.inner.urls[*next % self.inner.urls.len()].clone();
                *next = next.wrapping_add(1);
                url
            };
            if !self
                .inner
                .breaker
                .lock()
                .expect("breaker lock poisoned")
                .allow(Instant::now())
            {
                return Err(last_error.unwrap_or(Error::CircuitOpen { broker: url }));
            }
            // Whatever ends this attempt (an answer, an error, or this future being dropped),
            // the breaker learns of it: a half-open probe that vanished would keep it open.
            let attempt = Attempt {
                breaker: &self.inner.breaker,
            };
            let connected =
                Connection::connect_with(&url, self.inner.options.connection.clone()).await;
            let mut breaker = attempt.settle();
            match connected {
                Ok(connection) => {
                    // Connected is not answered: a broker (or a proxy in front of it) that
                    // accepts and then drops every connection must still open the breaker, so
                    // only a probe is settled here; answers close the breaker.
                    breaker.on_connected();
                    drop(breaker);
                    *current = Some(connection.clone());
                    return Ok(connection);
                }
                // Any way of not connecting (a bad address or CA file too) is a failed attempt.
                Err(error) => {
                    breaker.on_failure(Instant::now());
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one URL"))
    }

    /// Counts `error` against the breaker if it says the broker is unreachable or silent.
    /// `on` is the connection it happened on, when known: the calls in flight on a connection
    /// that breaks all fail with it, and count as one failure, not one each.
    fn record_failure(&self, error: &Error, on: Option<&Connection>) {
        let counts = match error {
            Error::ConnectionClosed | Error::Io(_) => match on {
                Some(connection) => {
                    let mut counted = self
                        .inner
                        .broken_counted
                        .lock()
                        .expect("breaker lock poisoned");
                    let first = *counted != Some(connection.identity());
                    *counted = Some(connection.identity());
                    first
                }
                None => true,
            },
            Error::Connect { .. } | Error::Timeout { .. } => true,
            _ => false,
        };
        if counts {
            self.inner
                .breaker
                .lock()
                .expect("breaker lock poisoned")
                .on_failure(Instant::now());
        }
    }

    /// Sends one request once. A broken connection is dropped so the next call reconnects.
    pub async fn send(&self, request: impl Into<Request>) -> Result<Response> {
        self.send_within(request, None).await
    }

    /// [`Client::send`], the whole call (finding a connection included) taking at most
    /// `timeout` when given (less than the connection's request timeout). An answer not had in
    /// time counts against the breaker as the connection's own timeout does: a connection that
    /// stays up and answers nothing is dropped once the breaker opens.
    pub(crate) async fn send_within(
        &self,
        request: impl Into<Request>,
        timeout: Option<Duration>,
    ) -> Result<Response> {
        let deadline = timeout.map(|timeout| tokio::time::Instant::now() + timeout);
        let timed_out = || Error::Timeout {
            timeout_ms: timeout.map_or(0, crate::connection::duration_ms),
        };
        let connection = match deadline {
            None => self.connection().await?,
            Some(deadline) => tokio::time::timeout_at(deadline, self.connection())
                .await
                .map_err(|_| timed_out())??,
        };
        let sending = connection.send(request);
        let result = match deadline {
            None => sending.await,
            Some(deadline) => tokio::time::timeout_at(deadline, sending)
                .await
                .unwrap_or_else(|_| Err(timed_out())),
        };
        match &result {
            Ok(_) => self.record_success(),
            Err(error) => self.record_failure(error, Some(&connection)),
        }
        result
    }

    pub(crate) fn record_success(&self) {
        self.inner
            .breaker
            .lock()
            .expect("breaker lock poisoned")
            .on_success();
    }

    /// Tells the circuit breaker how a request ended: an answer closes it, a broken or silent
    /// connection counts as a failure.
    pub(crate) fn record_outcome(&self, result: &Result<Response>) {
        match result {
            Ok(_) => self.record_success(),
            Err(error) => self.record_failure(error, None),
        }
    }

    /// Queues a request on the live connection and returns once its frame is in the write
    /// queue; await [`PendingResponse::response`] for the answer. Requests queued one after the
    /// other go out in that order.
    pub async fn enqueue(&self, request: impl Into<Request>) -> Result<PendingResponse> {
        let connection = self.connection().await?;
        let result = connection.enqueue(request).await;
        if let Err(error) = &result {
            self.record_failure(error, Some(&connection));
        }
        result
    }

    /// Sends a request that expects no response (produce with acks=none).
    pub async fn send_without_response(&self, request: impl Into<Request>) -> Result<()> {
        let connection = self.connection().await?;
        let result = connection.send_without_response(request).await;
        if let Err(error) = &result {
            self.record_failure(error, Some(&connection));
        }
        result
    }

    /// Sends a request, retrying retriable errors (lost connections, timeouts, broker codes
    /// that say "later") with exponential backoff and jitter until the retry deadline.
    ///
    /// Only use it for requests that are safe to repeat (reads, admin calls, idempotent
    /// produces, commits): a request whose answer was lost may have taken effect.
    pub async fn send_with_retry(&self, request: impl Into<Request>) -> Result<Response> {
        self.send_with_retry_telling(request)
            .await
            .map(|(response, _)| response)
    }

    /// [`send_with_retry`](Self::send_with_retry), also telling whether the answer is to a
    /// repeat: an earlier attempt may then have taken effect already (a topic created by an
    /// attempt whose answer was lost is "already there" to the next).
    pub(crate) async fn send_with_retry_telling(
        &self,
        request: impl Into<Request>,
    ) -> Result<(Response, bool)> {
        let request = request.into();
        let deadline = Instant::now() + self.inner.options.retry_deadline;
        let mut backoff = Backoff::new(
            self.inner.options.retry_initial_backoff,
            self.inner.options.retry_max_backoff,
        );
        // Whether an earlier attempt may have taken effect: only one whose answer was lost (a
        // timeout, a connection that broke) might have; a refusal or a failure to connect
        // did not.
        let mut maybe_applied = false;
        loop {
            let error = match self.send(request.clone()).await {
                Ok(response) => return Ok((response, maybe_applied)),
                Err(error) => error,
            };
            maybe_applied |= matches!(
                error,
                Error::Timeout { .. } | Error::ConnectionClosed | Error::Io(_)
            );
            let delay = backoff.next_delay();
            if !error.is_retriable() || Instant::now() + delay >= deadline {
                return Err(if backoff.attempts() > 1 {
                    Error::RetriesExhausted {
                        attempts: backoff.attempts(),
                        last: Box::new(error),
                    }
                } else {
                    error
                });
            }
            tracing::debug!(%error, delay_ms = delay.as_millis() as u64, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// A builder for a [`Producer`](crate::producer::Producer) on this client.
    pub fn producer(&self) -> crate::producer::ProducerBuilder {
        crate::producer::Producer::builder(self)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Some(connection) = self.inner.current.lock().await.take() {
            connection.close().await;
        }
    }
}

/// A connection attempt the breaker let through, until its outcome is known.
struct Attempt<'a> {
    breaker: &'a std::sync::Mutex<CircuitBreaker>,
}

impl<'a> Attempt<'a> {
    /// The breaker, to record the outcome in.
    fn settle(self) -> std::sync::MutexGuard<'a, CircuitBreaker> {
        let breaker = self.breaker;
        std::mem::forget(self);
        breaker.lock().expect("breaker lock poisoned")
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.breaker
            .lock()
            .expect("breaker lock poisoned")
            .on_abandoned();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calls in flight on a connection that breaks all fail with `ConnectionClosed`; they
    /// count as one failure, so a broker restart with a few calls out does not open the
    /// breaker by itself. Another connection breaking counts again.
    #[tokio::test]
    async fn calls_failing_with_one_broken_connection_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let broker = sluice_broker::Broker::start(sluice_broker::Config::on_loopback(dir.path()))
            .await
            .unwrap();
        let url = format!("tcp://{}", broker.tcp_addr);
        let options = ClientOptions::default().breaker(BreakerOptions {
            failure_threshold: 2,
            open_for: Duration::from_secs(60),
        });
        let client = Client::connect_with(&url, options).await.unwrap();
        let connection = client.connection().await.unwrap();
        for _ in 0..5 {
            client.record_failure(&Error::ConnectionClosed, Some(&connection));
        }
        assert_eq!(client.breaker_state(), BreakerState::Closed { failures: 1 });
        let other = Connection::connect(&url).await.unwrap();
        client.record_failure(&Error::ConnectionClosed, Some(&other));
        assert!(matches!(client.breaker_state(), BreakerState::Open { .. }));
        other.close().await;
        connection.close().await;
        broker.shutdown().await;
    }

    /// An answer not awaited past `send_within`'s timeout counts against the breaker as the
    /// connection's own timeout does: a broker that takes requests and answers none opens it,
    /// and the silent connection is then dropped.
    #[tokio::test]
    async fn answers_given_up_on_count_against_the_breaker() {
        let url = crate::test_support::silent_listener().await;
        let options = ClientOptions::default().breaker(BreakerOptions {
            failure_threshold: 2,
            open_for: Duration::from_secs(60),
        });
        let client = Client::connect_with(&url, options).await.unwrap();
        for _ in 0..2 {
            let answer = client
                .send_within(
                    sluice_protocol::messages::ApiVersionsRequest {},
                    Some(Duration::from_millis(50)),
                )
                .await;
            assert!(
                matches!(answer, Err(Error::Timeout { timeout_ms: 50 })),
                "{answer:?}"
            );
        }
        assert!(matches!(client.breaker_state(), BreakerState::Open { .. }));
    }
}
