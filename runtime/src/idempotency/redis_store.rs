//! Idempotency records in Redis, shared by several sluice replicas. Each key
//! is a Redis string `p:<owner>` (in progress) or `d:` (done) with a TTL
//! (the lease or the done TTL), changed only by atomic scripts.

use super::{ms, Claim, GateError, IdempotencyStore};
use crate::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::Script;
use std::time::Duration;

const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'p:' .. ARGV[1], 'PX', ARGV[2])
  return 'acquired'
end
if string.sub(v, 1, 2) == 'd:' then return 'done' end
return 'busy:' .. redis.call('PTTL', KEYS[1])
";

const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or v == 'p:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'd:', 'PX', ARGV[2])
end
return 1
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == 'p:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    claim: Script,
    complete: Script,
    release: Script,
}

fn redis_err(e: redis::RedisError) -> GateError {
    GateError::Redis(e)
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`); keys get `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, GateError> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let connection = ConnectionManager::new(client).await.map_err(redis_err)?;
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            claim: Script::new(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl IdempotencyStore for RedisStore {
    fn claim<'a>(&'a self, key: &'a str, owner: &'a str, lease: Duration) -> BoxFuture<'a, Result<Claim, GateError>> {
        Box::pin(async move {
            let mut con = self.connection.clone();
            let answer: String = self
                .claim
                .key(self.key(key))
                .arg(owner)
                .arg(ms(lease).max(1))
                .invoke_async(&mut con)
                .await
                .map_err(redis_err)?;
            Ok(match answer.as_str() {
                "acquired" => Claim::Acquired,
                "done" => Claim::Done,
                busy => {
                    let left: i64 = busy.trim_start_matches("busy:").parse().unwrap_or(100);
                    Claim::Busy {
                        retry_in: Duration::from_millis(u64::try_from(left.max(1)).unwrap_or(100)),
                    }
                }
            })
        })
    }

    fn complete<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<(), GateError>> {
        Box::pin(async move {
            let mut con = self.connection.clone();
            let _: i64 = self
                .complete
                .key(self.key(key))
                .arg(owner)
                .arg(ms(ttl).max(1))
                .invoke_async(&mut con)
                .await
                .map_err(redis_err)?;
            Ok(())
        })
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), GateError>> {
        Box::pin(async move {
            let mut con = self.connection.clone();
            let _: i64 = self
                .release
                .key(self.key(key))
                .arg(owner)
                .invoke_async(&mut con)
                .await
                .map_err(redis_err)?;
            Ok(())
        })
    }
}
