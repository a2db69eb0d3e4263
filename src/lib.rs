//! Tessera: a workload-identity credential broker.
//!
//! Module map, in the order a credential travels (imports point down this list only):
//!
//! - [`app`]: config → every part built → served → drained on shutdown.
//! - [`api`]: adapters (Workload API, admin, HTTP); the one place domain errors become
//!   gRPC status codes.
//! - [`issuer`]: THE issuance path: attest → match entry → mint → hand out.
//! - [`config`], [`registry`]: typed configuration; entries (the inventory) and matching.
//! - [`lease`]: every credential as a lease: table, durable store, reaper, kill list.
//! - [`attest`], [`ca`]: kernel attestation; the CA, bundles, SVID minting and validation.
//! - [`audit`]: the hash-chained audit log.
//! - [`spiffe_id`], [`jose`], [`shutdown`], [`fsutil`], [`entropy`], [`proto`]: leaves.
//! - [`cli`]: the `tessera` command, a client of the APIs like any other.
#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod attest;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod config;
pub mod entropy;
pub mod exchange;
pub mod fsutil;
pub mod fuzzing;
pub mod issuer;
pub mod jose;
pub mod lease;
pub mod metrics;
pub mod oidc;
pub mod policy;
pub mod proto;
pub mod registry;
pub mod shutdown;
pub mod spiffe_id;
