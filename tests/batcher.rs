//! The dynamic batcher with a mock backend that records every batch it runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatguard::infer::{Backend, Batcher, BatcherConfig, InferError, Prepare};

/// What a test asks of the mock model for one request.
#[derive(Debug, Clone, Copy, Default)]
struct Job {
    /// Echoed back (doubled) so replies can be matched to requests.
    id: u64,
    /// Cost in `max_batch_tokens` units.
    cost: usize,
    /// The batch containing this job sleeps this long.
    sleep_ms: u64,
    /// The batch containing this job waits on the gate before running.
    gated: bool,
    /// The batch containing this job fails.
    fail: bool,
    /// The batch containing this job panics.
    panic: bool,
    /// Preparation of this job fails.
    bad_input: bool,
}

impl Job {
    fn id(id: u64) -> Job {
        Job {
            id,
            cost: 1,
            ..Job::default()
        }
    }
}

/// Counts prepared jobs so tests can wait until a backlog has reached the model queue.
#[derive(Default)]
struct MockPrepare {
    prepared: Arc<AtomicUsize>,
}

impl Prepare for MockPrepare {
    type Request = Job;
    type Item = Job;
    fn prepare(&mut self, job: Job) -> Result<Job, InferError> {
        // Counted before the hand-off to the model queue; `wait_prepared` allows for that.
        self.prepared.fetch_add(1, Ordering::SeqCst);
        if job.bad_input {
            Err(InferError::Input(format!("job {} is bad", job.id)))
        } else {
            Ok(job)
        }
    }
}

/// Records batches (job ids); optionally blocks on a gate.
struct MockBackend {
    /// Every batch run, in order.
    batches: Arc<Mutex<Vec<Vec<u64>>>>,
    /// Told when a gated batch has started.
    started_tx: mpsc::Sender<()>,
    /// Released by the test to let a gated batch finish.
    gate_rx: mpsc::Receiver<()>,
}

impl Backend for MockBackend {
    type Item = Job;
    type Output = u64;
    fn cost(&self, job: &Job) -> usize {
        job.cost
    }
    fn run(&mut self, batch: Vec<Job>) -> Result<Vec<u64>, InferError> {
        self.batches
            .lock()
            .unwrap()
            .push(batch.iter().map(|j| j.id).collect());
        if batch.iter().any(|j| j.gated) {
            self.started_tx.send(()).unwrap();
            self.gate_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        let sleep = batch.iter().map(|j| j.sleep_ms).max().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(sleep));
        if batch.iter().any(|j| j.panic) {
            panic!("mock model exploded");
        }
        if batch.iter().any(|j| j.fail) {
            return Err(InferError::Backend("mock failure".into()));
        }
        Ok(batch.iter().map(|j| j.id * 2).collect())
    }
}

/// A running mock batcher plus its probes.
struct Mock {
    batcher: Batcher<Job, u64>,
    batches: Arc<Mutex<Vec<Vec<u64>>>>,
    started_rx: mpsc::Receiver<()>,
    gate_tx: mpsc::Sender<()>,
    prepared: Arc<AtomicUsize>,
}

impl Mock {
    fn new(
        max_batch_size: usize,
        max_batch_tokens: usize,
        queue_capacity: usize,
        queue_timeout_ms: u64,
    ) -> Mock {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started_rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel();
        let config = BatcherConfig {
            name: "mock".into(),
            max_batch_size,
            max_batch_tokens,
            queue_capacity,
            queue_timeout: Duration::from_millis(queue_timeout_ms),
        };
        let backend = MockBackend {
            batches: batches.clone(),
            started_tx,
            gate_rx,
        };
        let prepare = MockPrepare::default();
        let prepared = prepare.prepared.clone();
        let batcher = Batcher::spawn(config, prepare, backend).unwrap();
        Mock {
            batcher,
            batches,
            started_rx,
            gate_tx,
            prepared,
        }
    }

    fn batches(&self) -> Vec<Vec<u64>> {
        self.batches.lock().unwrap().clone()
    }

    fn ran(&self, id: u64) -> bool {
        self.batches().iter().flatten().any(|&i| i == id)
    }

    /// Submits a gated job and waits until the model thread is blocked inside it.
    fn occupy_model(&self, id: u64) -> tokio::sync::oneshot::Receiver<Result<u64, InferError>> {
        let rx = self
            .batcher
            .enqueue(Job {
                gated: true,
                ..Job::id(id)
            })
            .unwrap();
        self.started_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap();
        rx
    }

    /// Waits until `n` jobs in all have been prepared and handed to the model queue.
    async fn wait_prepared(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.prepared.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} jobs prepared",
                self.prepared.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The count goes up just before the hand-off; give the channel send a moment.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    fn release_model(&self) {
        self.gate_tx.send(()).unwrap();
    }
}

/// Submits `jobs` concurrently from tokio tasks; returns (job, result) pairs.
async fn submit_all(
    batcher: &Batcher<Job, u64>,
    jobs: Vec<Job>,
) -> Vec<(Job, Result<u64, InferError>)> {
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let batcher = batcher.clone();
            tokio::spawn(async move { (job, batcher.submit(job).await) })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_match_requests_under_concurrency() {
    let mock = Mock::new(16, 1000, 1000, 5000);
    let jobs: Vec<Job> = (0..500).map(Job::id).collect();
    let results = submit_all(&mock.batcher, jobs).await;
    let mut failures = Vec::new();
    for (job, result) in &results {
        if *result != Ok(job.id * 2) {
            failures.push(format!("job {} got {result:?}", job.id));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every job ran exactly once.
    let mut ran: Vec<u64> = mock.batches().into_iter().flatten().collect();
    ran.sort_unstable();
    assert_eq!(ran, (0..500).collect::<Vec<_>>());
    let stats = mock.batcher.stats();
    assert_eq!(stats.submitted, 500);
    assert_eq!(stats.batched_items, 500);
    assert_eq!(stats.queue_depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_form_under_load_and_respect_max_batch_size() {
    let mock = Mock::new(8, 1000, 1000, 5000);
    // Hold the model so the queue fills, then release: the backlog must go in batches of <= 8.
    let first = mock.occupy_model(1000);
    let backlog: Vec<Job> = (0..40)
        .map(|i| Job {
            sleep_ms: 2,
            ..Job::id(i)
        })
        .collect();
    let batcher = mock.batcher.clone();
    let waiter = tokio::spawn(async move { submit_all(&batcher, backlog).await });
    // Wait until the whole backlog is queued for the model (1 gated + 40).
    mock.wait_prepared(41).await;
    mock.release_model();
    assert_eq!(first.await.unwrap(), Ok(2000));
    for (job, result) in waiter.await.unwrap() {
        assert_eq!(result, Ok(job.id * 2));
    }
    let sizes: Vec<usize> = mock.batches().iter().skip(1).map(Vec::len).collect();
    assert!(
        sizes.iter().all(|&n| n <= 8),
        "batch over max_batch_size: {sizes:?}"
    );
    assert_eq!(
        sizes,
        vec![8; 5],
        "a full backlog should go in full batches"
    );
    assert_eq!(mock.batcher.stats().max_batch_seen, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_respect_max_batch_tokens_padded() {
    // Padded cost: items × largest cost <= 20.
    let mock = Mock::new(100, 20, 1000, 5000);
    let first = mock.occupy_model(1000);
    let costs = [5, 5, 5, 5, 5, 10, 2, 2, 30, 1, 1];
    let jobs: Vec<Job> = costs
        .iter()
        .enumerate()
        .map(|(i, &cost)| Job {
            cost,
            ..Job::id(i as u64)
        })
        .collect();
    let mut receivers = Vec::new();
    for job in &jobs {
        receivers.push(mock.batcher.enqueue(*job).unwrap());
    }
    mock.wait_prepared(1 + jobs.len()).await;
    mock.release_model();
    first.await.unwrap().unwrap();
    for (job, rx) in jobs.iter().zip(receivers) {
        assert_eq!(rx.await.unwrap(), Ok(job.id * 2));
    }
    let batches: Vec<Vec<u64>> = mock.batches().into_iter().skip(1).collect();
    for batch in &batches {
        let max = batch.iter().map(|&i| costs[i as usize]).max().unwrap();
        assert!(
            batch.len() == 1 || batch.len() * max <= 20,
            "batch {batch:?} exceeds 20 padded tokens"
        );
    }
    // FIFO: [5,5,5,5] | [5,10] | [2,2] | [30] alone (over the limit, still runs) | [1,1]
    assert_eq!(
        batches,
        vec![
            vec![0, 1, 2, 3],
            vec![4, 5],
            vec![6, 7],
            vec![8],
            vec![9, 10]
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_request_runs_immediately() {
    let mock = Mock::new(32, 10_000, 100, 60_000);
    // Warm the threads up.
    assert_eq!(mock.batcher.submit(Job::id(1)).await, Ok(2));
    let mut latencies = Vec::new();
    for id in 2..13 {
        let started = Instant::now();
        assert_eq!(mock.batcher.submit(Job::id(id)).await, Ok(id * 2));
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    // No batching timer: a lone request's latency is the model's (here 0) plus two thread
    // hand-offs — well under a millisecond on an idle machine; the bound allows a busy one.
    let median = latencies[latencies.len() / 2];
    assert!(
        median < Duration::from_millis(20),
        "lone requests took {latencies:?}"
    );
    assert!(mock.batches().iter().all(|b| b.len() == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_deadline_answers_timeout_without_running() {
    let mock = Mock::new(32, 10_000, 100, 50);
    let first = mock.occupy_model(1);
    let late = mock.batcher.enqueue(Job::id(2)).unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    mock.release_model();
    assert_eq!(first.await.unwrap(), Ok(2));
    match late.await.unwrap() {
        Err(InferError::Timeout {
            waited_ms,
            limit_ms,
        }) => {
            assert_eq!(limit_ms, 50);
            assert!(waited_ms >= 50, "waited {waited_ms} ms");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(!mock.ran(2), "timed-out request must not run");
    assert_eq!(mock.batcher.stats().timeouts, 1);
    assert_eq!(mock.batcher.stats().queue_depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_requester_is_skipped() {
    let mock = Mock::new(32, 10_000, 100, 5000);
    let first = mock.occupy_model(1);
    let abandoned = mock.batcher.enqueue(Job::id(2)).unwrap();
    drop(abandoned);
    // A caller whose future is dropped mid-wait withdraws too.
    let batcher = mock.batcher.clone();
    let task = tokio::spawn(async move { batcher.submit(Job::id(3)).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    task.abort();
    let _ = task.await;
    let kept = mock.batcher.enqueue(Job::id(4)).unwrap();
    mock.release_model();
    assert_eq!(first.await.unwrap(), Ok(2));
    assert_eq!(kept.await.unwrap(), Ok(8));
    assert!(
        !mock.ran(2) && !mock.ran(3),
        "abandoned requests ran: {:?}",
        mock.batches()
    );
    assert_eq!(mock.batcher.stats().cancelled, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_overloaded_immediately() {
    let mock = Mock::new(32, 10_000, 3, 5000);
    let first = mock.occupy_model(1);
    let queued: Vec<_> = (2..5)
        .map(|id| mock.batcher.enqueue(Job::id(id)).unwrap())
        .collect();
    let started = Instant::now();
    let refused = mock.batcher.submit(Job::id(5)).await;
    let took = started.elapsed();
    assert_eq!(refused, Err(InferError::Overloaded { capacity: 3 }));
    assert!(took < Duration::from_millis(20), "refusal took {took:?}");
    assert_eq!(mock.batcher.stats().overloads, 1);
    mock.release_model();
    assert_eq!(first.await.unwrap(), Ok(2));
    for (id, rx) in (2..5).zip(queued) {
        assert_eq!(rx.await.unwrap(), Ok(id * 2));
    }
    // Room again once the queue drained.
    assert_eq!(mock.batcher.submit(Job::id(6)).await, Ok(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_error_and_panic_reach_that_batch_only() {
    let mock = Mock::new(32, 10_000, 100, 5000);
    // A failing batch.
    let first = mock.occupy_model(1);
    let doomed: Vec<_> = [
        Job {
            fail: true,
            ..Job::id(2)
        },
        Job::id(3),
    ]
    .into_iter()
    .map(|j| mock.batcher.enqueue(j).unwrap())
    .collect();
    mock.wait_prepared(3).await;
    mock.release_model();
    assert_eq!(first.await.unwrap(), Ok(2));
    for rx in doomed {
        assert_eq!(
            rx.await.unwrap(),
            Err(InferError::Backend("mock failure".into()))
        );
    }
    // A panicking batch: its waiters get an error, the thread survives.
    let result = mock
        .batcher
        .submit(Job {
            panic: true,
            ..Job::id(4)
        })
        .await;
    match result {
        Err(InferError::Backend(msg)) => assert!(msg.contains("mock model exploded"), "{msg}"),
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert_eq!(mock.batcher.submit(Job::id(5)).await, Ok(10));
    // A bad input fails alone, at preparation.
    let bad = mock
        .batcher
        .submit(Job {
            bad_input: true,
            ..Job::id(6)
        })
        .await;
    assert!(matches!(bad, Err(InferError::Input(_))), "{bad:?}");
    assert!(!mock.ran(6));
    assert_eq!(mock.batcher.submit(Job::id(7)).await, Ok(14));
    assert_eq!(mock.batcher.stats().failed, 4);
}

#[test]
fn blocking_submit_and_config_validation() {
    let mock = Mock::new(4, 100, 10, 5000);
    assert_eq!(mock.batcher.submit_blocking(Job::id(21)), Ok(42));
    let zero = BatcherConfig {
        name: "bad".into(),
        max_batch_size: 0,
        max_batch_tokens: 10,
        queue_capacity: 10,
        queue_timeout: Duration::from_millis(10),
    };
    let (started_tx, _started_rx) = mpsc::channel();
    let (_gate_tx, gate_rx) = mpsc::channel();
    let backend = MockBackend {
        batches: Arc::default(),
        started_tx,
        gate_rx,
    };
    match Batcher::spawn(zero, MockPrepare::default(), backend) {
        Err(InferError::Config { setting, .. }) => assert_eq!(setting, "max_batch_size"),
        Err(other) => panic!("wrong error {other}"),
        Ok(_) => panic!("max_batch_size = 0 accepted"),
    }
}

/// A batcher over several mock backends (one model thread each) plus its probes.
struct Pool {
    batcher: Batcher<Job, u64>,
    /// Every batch run, by any thread.
    batches: Arc<Mutex<Vec<Vec<u64>>>>,
    /// One message each time a gated batch starts, from any thread.
    started_rx: mpsc::Receiver<()>,
    /// One gate per backend.
    gates: Vec<mpsc::Sender<()>>,
}

fn pool(n: usize, max_batch_size: usize) -> Pool {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let (started_tx, started_rx) = mpsc::channel();
    let mut gates = Vec::new();
    let backends = (0..n)
        .map(|_| {
            let (gate_tx, gate_rx) = mpsc::channel();
            gates.push(gate_tx);
            MockBackend {
                batches: batches.clone(),
                started_tx: started_tx.clone(),
                gate_rx,
            }
        })
        .collect();
    let config = BatcherConfig {
        name: "pool".into(),
        max_batch_size,
        max_batch_tokens: 1000,
        queue_capacity: 1000,
        queue_timeout: Duration::from_millis(5000),
    };
    let batcher = Batcher::spawn_pool(config, MockPrepare::default(), backends).unwrap();
    Pool {
        batcher,
        batches,
        started_rx,
        gates,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_runs_batches_side_by_side() {
    let Pool {
        batcher,
        batches,
        started_rx,
        gates,
    } = pool(2, 8);
    let gated = |id| Job {
        gated: true,
        ..Job::id(id)
    };
    // The first gated batch holds one model thread; the second must start on the other one
    // while the first is still blocked (one model thread would never report it).
    let first = batcher.enqueue(gated(1)).unwrap();
    started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let second = batcher.enqueue(gated(2)).unwrap();
    started_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the second model thread did not start a batch while the first was busy");
    for gate in &gates {
        gate.send(()).unwrap();
    }
    assert_eq!(first.await.unwrap(), Ok(2));
    assert_eq!(second.await.unwrap(), Ok(4));
    assert_eq!(batches.lock().unwrap().clone(), vec![vec![1], vec![2]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_answers_every_request_once() {
    let Pool {
        batcher, batches, ..
    } = pool(3, 16);
    let jobs: Vec<Job> = (0..600)
        .map(|id| Job {
            // Some batches take a while, so all three threads hold batches at once.
            sleep_ms: u64::from(id % 50 == 0),
            ..Job::id(id)
        })
        .collect();
    let results = submit_all(&batcher, jobs).await;
    let wrong: Vec<String> = results
        .iter()
        .filter(|(job, result)| *result != Ok(job.id * 2))
        .map(|(job, result)| format!("job {} got {result:?}", job.id))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let mut ran: Vec<u64> = batches.lock().unwrap().iter().flatten().copied().collect();
    ran.sort_unstable();
    assert_eq!(ran, (0..600).collect::<Vec<_>>());
    assert!(batches.lock().unwrap().iter().all(|b| b.len() <= 16));
    let stats = batcher.stats();
    assert_eq!((stats.submitted, stats.batched_items), (600, 600));
    assert_eq!(stats.queue_depth, 0);
    // Dropping the last handle lets every model thread drain and exit.
    drop(batcher);
}

#[test]
fn a_pool_needs_a_backend() {
    let config = BatcherConfig {
        name: "empty".into(),
        max_batch_size: 4,
        max_batch_tokens: 10,
        queue_capacity: 10,
        queue_timeout: Duration::from_millis(10),
    };
    match Batcher::<Job, u64>::spawn_pool(config, MockPrepare::default(), Vec::<MockBackend>::new())
    {
        Err(InferError::Config { setting, .. }) => assert_eq!(setting, "workers"),
        Err(other) => panic!("wrong error {other}"),
        Ok(_) => panic!("a pool without backends was accepted"),
    }
}
