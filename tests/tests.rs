
mod e2e;
