//! Segment objects: one group-committed batch of envelopes at one log position.
//!
//! A segment is newline-delimited JSON, one compact envelope per line. Keeping each envelope's
//! bytes as a separate line lets the relay publish exactly the bytes the writer stored.

use crate::envelope::EventEnvelope;
use bytes::{BufMut, Bytes, BytesMut};
use std::ops::Range;

/// A decoded segment: its raw bytes and, for each envelope, its parsed form and byte range.
#[derive(Debug, Clone)]
pub struct Segment {
    pub position: u64,
    raw: Bytes,
    lines: Vec<Range<usize>>,
    pub events: Vec<EventEnvelope>,
}

/// Why a stored segment could not be read.
#[derive(Debug, thiserror::Error)]
#[error("segment {position} line {line}: {source}")]
pub struct DecodeError {
    pub position: u64,
    pub line: usize,
    #[source]
    pub source: serde_json::Error,
}

impl Segment {
    /// Encodes envelopes as NDJSON. Envelopes always serialise (no non-string map keys, no
    /// non-finite floats reach them), so encoding cannot fail.
    pub fn encode(events: &[EventEnvelope]) -> Bytes {
        let mut buf = BytesMut::with_capacity(events.len() * 512);
        for event in events {
            let line = serde_json::to_vec(event).expect("an envelope always serialises");
            buf.put_slice(&line);
            buf.put_u8(b'\n');
        }
        buf.freeze()
    }

    pub fn decode(position: u64, raw: Bytes) -> Result<Segment, DecodeError> {
        let mut lines = Vec::new();
        let mut events = Vec::new();
        let mut start = 0;
        for (line, chunk) in raw.split(|b| *b == b'\n').enumerate() {
            let range = start..start + chunk.len();
            start = range.end + 1;
            if chunk.is_empty() {
                continue;
            }
            let event = serde_json::from_slice(chunk)
                .map_err(|source| DecodeError { position, line: line + 1, source })?;
            lines.push(range);
            events.push(event);
        }
        Ok(Segment { position, raw, lines, events })
    }

    /// The stored bytes of the `index`-th envelope, without the newline.
    pub fn raw_event(&self, index: usize) -> Bytes {
        self.raw.slice(self.lines[index].clone())
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AggregateKey, Command, CommandType};
    use crate::domain::commands::Routing;
    use chrono::Utc;
    use uuid::Uuid;

    fn envelope(n: u64) -> EventEnvelope {
        let cmd = Command {
            command_type: CommandType::CreateDatabase,
            aggregate: AggregateKey::database(&format!("db{n}")),
            expected_seq: 0,
            payload: serde_json::json!({"description": "line\nbreak"}),
        };
        let id = Uuid::new_v4();
        let routing = Routing { kafka_topic: "t".into(), service: "s".into() };
        let mut env = cmd.to_envelope(id, id, None, Utc::now(), &routing);
        env.sequence_number = Some(1);
        env
    }

    #[test]
    fn encode_decode_round_trip_keeps_bytes() {
        let events: Vec<_> = (0..3).map(envelope).collect();
        let raw = Segment::encode(&events);
        let seg = Segment::decode(7, raw).unwrap();
        assert_eq!(seg.events, events);
        for (i, event) in events.iter().enumerate() {
            assert_eq!(seg.raw_event(i), serde_json::to_vec(event).unwrap());
        }
    }

    #[test]
    fn corrupt_line_is_reported_with_its_place() {
        let mut raw = Segment::encode(&[envelope(1)]).to_vec();
        raw.extend_from_slice(b"{not json}\n");
        let err = Segment::decode(3, raw.into()).unwrap_err();
        assert_eq!((err.position, err.line), (3, 2));
    }
}
