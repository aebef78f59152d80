mod batcher;
mod behaviour;
mod common;
mod e2e;
mod image;
mod model;
mod text;
