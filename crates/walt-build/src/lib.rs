//! `walt image build`: from a Dockerfile and a context to a plan of steps.
//!
//! - [`dockerfile`]: the instructions of a Dockerfile, with their lines;
//! - [`expand`]: Docker's variable expansion and ARG/ENV scoping;
//! - [`plan`]: stages, base images, `COPY --from` references, the steps;
//! - [`ignore`]: `.dockerignore` patterns;
//! - [`context`]: the build context (confined paths, globs, tar stream);
//! - [`copy`]: the tar stream of a COPY/ADD, `--chmod`, local archives for ADD;
//! - [`cache`]: the layer cache keys.

pub mod cache;
pub mod context;
pub mod copy;
pub mod dockerfile;
pub mod expand;
pub mod ignore;
pub mod plan;
