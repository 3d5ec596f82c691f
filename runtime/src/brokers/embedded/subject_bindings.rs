//! Which queues a subject reaches: queue name -> subject patterns.

use crate::subject::SubjectPattern;

#[derive(Default)]
pub struct Bindings {
    queues: Vec<QueueBinding>,
}

struct QueueBinding {
    name: String,
    patterns: Vec<SubjectPattern>,
    max_len: Option<u64>,
}

impl Bindings {
    /// Declares `name`, or replaces its patterns and cap.
    pub fn declare(&mut self, name: &str, patterns: Vec<SubjectPattern>, max_len: Option<u64>) {
        self.queues.retain(|q| q.name != name);
        self.queues.push(QueueBinding {
            name: name.to_owned(),
            patterns,
            max_len,
        });
    }

    /// Each queue (once) with a pattern matching `subject`, and its cap.
    pub fn queues_for<'a>(&'a self, subject: &'a str) -> impl Iterator<Item = (&'a str, Option<u64>)> + 'a {
        self.queues
            .iter()
            .filter(move |q| q.patterns.iter().any(|p| p.matches(subject)))
            .map(|q| (q.name.as_str(), q.max_len))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.queues.iter().map(|q| q.name.as_str())
    }

    pub fn patterns_of(&self, name: &str) -> Vec<String> {
        self.queues
            .iter()
            .find(|q| q.name == name)
            .map(|q| q.patterns.iter().map(|p| p.to_string()).collect())
            .unwrap_or_default()
    }
}
