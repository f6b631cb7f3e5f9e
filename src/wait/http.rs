//! `--wait-http URL`: drained while the URL answers 2xx to a GET.
//!
//! One request at a time, on a non-blocking socket the event loop watches; the next goes out
//! `RESEND` after each answer or error, whatever it was. No request is timed out before the
//! deadline, so an endpoint that holds the request until the app has drained (a long poll,
//! Knative's `/wait-for-drain`) is served by the same option as one that answers 503 until it
//! has. It must never count an endpoint it cannot hear as drained: an error (nothing listens,
//! the connection closed without an answer, a head that does not parse) makes it unknown until
//! the next answer; a request still unanswered is in flight; and a 2xx counts only while it is
//! fresh (`FRESH`), so that an app that stops answering after it said "drained" is in flight
//! again.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::{Condition, Start};
use crate::budget::secs;
use crate::http::{self, Answer, Exchange, Outcome, Request};

/// After an answer or an error, the next request goes out this much later: as often as the
/// shutdown managers of Envoy Gateway and Istio poll their admin APIs.
pub const RESEND: Duration = Duration::from_secs(1);
/// A 2xx answer counts as drained for this long after it came: the request re-sent `RESEND`
/// later must be answered within the second after that.
const FRESH: Duration = Duration::from_secs(2);

/// The last word from the endpoint.
enum Heard {
    Nothing,
    Answer(Answer),
    /// Why there was no answer, as the log says it.
    Failure(String),
}

pub struct HttpWait {
    request: Request,
    label: String,
    heard: Heard,
    /// When `heard` came.
    heard_at: Instant,
    /// The request under way, if one is.
    exchange: Option<Exchange>,
    /// When the request under way (or, in `check`, the one given up) was sent.
    asked_at: Option<Instant>,
    next_send: Option<Instant>,
    /// Whether a 2xx answer has outlived `FRESH` with no other since.
    stale: bool,
}

impl HttpWait {
    pub fn new(request: &Request) -> HttpWait {
        HttpWait {
            label: request.to_string(),
            request: request.clone(),
            heard: Heard::Nothing,
            heard_at: Instant::now(),
            exchange: None,
            asked_at: None,
            next_send: None,
            stale: false,
        }
    }

    fn send(&mut self, now: Instant) {
        self.next_send = None;
        self.asked_at = Some(now);
        match Exchange::start(&self.request) {
            Ok(exchange) => self.exchange = Some(exchange),
            Err(failure) => self.hear(Outcome::Failed(failure), now),
        }
    }

    fn hear(&mut self, outcome: Outcome, now: Instant) {
        self.heard = match outcome {
            Outcome::Answered(answer) => Heard::Answer(answer),
            Outcome::Failed(failure) => Heard::Failure(failure.to_string()),
            // Only `check` gives a request up, at the end of its look: unanswered, it is
            // in flight, as a long poll is.
            Outcome::Deadline(_) => return,
        };
        self.heard_at = now;
        self.exchange = None;
        self.asked_at = None;
        self.stale = false;
        self.next_send = Some(now + RESEND);
    }

    /// A fresh 2xx, and no failure under way since: a failure's head counts from the moment
    /// it comes, not once its body has (or has not) followed.
    fn drained(&self) -> bool {
        matches!(&self.heard, Heard::Answer(a) if a.success())
            && !self.stale
            && self.failing().is_none()
    }

    /// The failure whose head has come on the request under way, if one has.
    fn failing(&self) -> Option<&Answer> {
        self.exchange.as_ref().and_then(Exchange::failed_head)
    }

    /// When a fresh 2xx stops counting, if one is what was heard last.
    fn fresh_until(&self) -> Option<Instant> {
        self.drained().then_some(self.heard_at + FRESH)
    }

    /// Where the request stands, for a progress line: the last status, or how long the
    /// request under way has waited.
    fn status(&self) -> String {
        let waited = self
            .asked_at
            .map(|at| format!("no answer yet after {}", secs(at.elapsed())));
        if let Some(failing) = self.failing() {
            return failing.to_string();
        }
        match (&self.heard, waited) {
            (Heard::Answer(a), _) if self.stale => format!(
                "{a} {} ago, and no answer since",
                secs(self.heard_at.elapsed())
            ),
            (Heard::Answer(a), _) => a.to_string(),
            (Heard::Failure(why), _) => why.clone(),
            (Heard::Nothing, Some(waited)) => waited,
            (Heard::Nothing, None) => "not asked yet".into(),
        }
    }
}

impl Condition for HttpWait {
    fn label(&self) -> &str {
        &self.label
    }

    fn start(&mut self, cx: &Start<'_>) {
        let now = Instant::now();
        if cx.watch {
            self.send(now);
            return;
        }
        // One request, answered within the look's time or in flight; none once an earlier
        // condition has taken all of that time.
        if now >= cx.deadline {
            self.heard = Heard::Failure("not asked: the look's time had run out".into());
            return;
        }
        self.asked_at = Some(now);
        if let Ok(outcome) = http::ask(&self.request, cx.deadline, None) {
            self.hear(outcome, Instant::now());
        }
    }

    fn watch(&self, add: &mut dyn FnMut(BorrowedFd<'_>, usize)) {
        if let Some(exchange) = self.exchange.as_ref().filter(|e| !e.wants_write()) {
            add(exchange.fd(), 0);
        }
    }

    fn watch_writable(&self, add: &mut dyn FnMut(BorrowedFd<'_>, usize)) {
        if let Some(exchange) = self.exchange.as_ref().filter(|e| e.wants_write()) {
            add(exchange.fd(), 0);
        }
    }

    fn on_ready(&mut self, _: usize) {
        let Some(ended) = self.exchange.as_mut().and_then(Exchange::advance) else {
            return;
        };
        let outcome = match ended {
            Ok(answer) => Outcome::Answered(answer),
            Err(failure) => Outcome::Failed(failure),
        };
        self.hear(outcome, Instant::now());
    }

    fn polled(&self) -> bool {
        false
    }

    fn refresh(&mut self) {
        let now = Instant::now();
        let lingered = self
            .exchange
            .as_mut()
            .filter(|e| e.until().is_some_and(|until| now >= until))
            .and_then(Exchange::give_up_body);
        if let Some(answer) = lingered {
            self.hear(Outcome::Answered(answer), now);
        }
        if self.fresh_until().is_some_and(|until| now >= until) {
            self.stale = true;
        }
        if self.exchange.is_none() && self.next_send.is_some_and(|at| now >= at) {
            self.send(now);
        }
    }

    fn next_look(&self) -> Option<Instant> {
        let send = self.next_send.filter(|_| self.exchange.is_none());
        let body = self.exchange.as_ref().and_then(Exchange::until);
        [send, body, self.fresh_until()].into_iter().flatten().min()
    }

    fn in_flight(&self) -> usize {
        usize::from(self.unknown().is_none() && !self.drained())
    }

    fn unknown(&self) -> Option<&str> {
        match &self.heard {
            Heard::Failure(why) => Some(why),
            _ => None,
        }
    }

    fn name_in_flight(&self, out: &mut Vec<String>, limit: usize) {
        if limit > 0 && self.in_flight() > 0 {
            out.push(format!("{}: {}", self.label, self.status()));
        }
    }

    fn state(&self) -> String {
        match (&self.heard, self.unknown()) {
            (_, Some(why)) => format!("unknown ({why})"),
            (Heard::Answer(a), None) if self.drained() => format!("drained ({a})"),
            _ => format!("in flight ({})", self.status()),
        }
    }

    fn plan(&self) -> String {
        format!(
            "{} answers 2xx: {}, sent again {}s after each answer (not sent in a dry run)",
            self.label,
            self.request.describe(),
            RESEND.as_secs()
        )
    }

    fn sends(&self) -> bool {
        true
    }
}
