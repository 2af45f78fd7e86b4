//! Waiting between tries of something that failed for a reason that passes (a database
//! restarting, a store not answering): exponential backoff with jitter, so that a fleet of
//! processes cut off together does not come back in lockstep.

use std::time::Duration;

pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// From a quarter of a second, doubling to five.
    pub(crate) fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(250),
            max: Duration::from_secs(5),
        }
    }

    /// The next wait: between half and all of the current step ("equal jitter").
    pub(crate) fn delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_with_jitter() {
        let mut b = Backoff::new();
        let waits: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        assert!(waits[0] >= Duration::from_millis(125) && waits[0] <= Duration::from_millis(250));
        assert!(waits[2] >= Duration::from_millis(500) && waits[2] <= Duration::from_secs(1));
        for w in &waits[5..] {
            assert!(
                *w >= Duration::from_millis(2500) && *w <= Duration::from_secs(5),
                "{w:?}"
            );
        }
    }
}
