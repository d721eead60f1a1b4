//! The dispatch protocol, read top to bottom in the order a commit goes through it (DESIGN.md,
//! "One commit's life" and "Deadlines instead of pings"; ARCHITECTURE.md draws the sequence).
//!
//! A *run* is one commit tested once; its *jobs* are what is assigned, leased, attempted and
//! finished (today a run has exactly one job, [`crate::subjects::JobRef`]); an *attempt* is one
//! try of a job on one runner.
//!
//! 1. [`commit`]: the observer (or `jetci rerun`) publishes the commit to `CI_COMMITS`
//!    ([`commit::publish_commit`]); a dispatcher pulls it and [`commit::accept`]s it.
//! 2. [`job`]: the job's state in `ci-jobs` and its transitions, `queued → assigned → running
//!    → final` ([`crate::messages::JobState`]'s methods `assign`, `claim`, `renew`, `requeue`,
//!    `hand_back`, `request_cancel`, `finish`), written by compare-and-set through [`store`].
//! 3. [`placement`]: the dispatcher picks a runner whose labels match and that has a free slot,
//!    writes `assigned` and publishes the job message on the runner's subject
//!    ([`crate::messages::JobMsg::for_attempt`], with the `assigned` state in its headers,
//!    [`attempt::assigned_headers`]).
//! 4. [`attempt`]: the runner claims the attempt in one compare-and-set, renews it every
//!    heartbeat (which extends its lease), fences before its verdict, or hands it back.
//! 5. [`lease`]: the dispatcher decides on every job it holds from the age of its state: adopt
//!    a live one, reassign a lost one as attempt n+1, give up after the last attempt, finish a
//!    cancelled one.
//! 6. [`verdict`]: exactly one final result per run on `ci.results.<repo>.<sha>.<run>`, first
//!    writer wins; the runner publishes it, or a dispatcher or `jetci cancel` gives it without a
//!    runner ([`verdict::finish_without_runner`]); then the job's state becomes `final` and the
//!    dispatcher acks the commit.
//!
//! The processes around it: [`crate::dispatcher`] (a sans-IO core that makes the decisions of
//! steps 3 and 5, and the driver that does its NATS work) and [`crate::runner`] (the runner's
//! loop around step 4, with the work of a job injected as an executor).

pub mod attempt;
pub mod commit;
pub mod job;
pub mod lease;
pub mod placement;
pub mod store;
pub mod verdict;
