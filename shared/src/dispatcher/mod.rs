//! The dispatcher process as a library: a sans-IO [`core`] that makes every decision of the
//! dispatch protocol ([`crate::protocol`]) and a [`driver`] that does its NATS work.
//! `jetci-dispatcher` parses its flags into a [`Config`] and calls [`run`].
//!
//! Several dispatchers may run at once: they share one durable consumer on `CI_COMMITS`, and
//! every change of a job's state is a compare-and-set in `ci-jobs`, so two of them never start
//! the same attempt.

pub mod core;
pub mod driver;

pub use self::core::Config;
pub use self::driver::{run, StartError};
