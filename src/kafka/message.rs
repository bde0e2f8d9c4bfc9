//! A message as librdkafka fetched it, owned without a copy: the payload is read where
//! librdkafka put it (the fetch response buffer) and the message is released when its owner
//! drops it. Measured on ~780-byte JSON messages, copying each out (its allocation and free)
//! was about a tenth of the ingest sidecar's CPU.

use std::ffi::CStr;
use std::ptr::NonNull;

use rdkafka::bindings as rdsys;

/// A message as librdkafka returned it from a batch read (`rd_kafka_consume_batch_queue`),
/// owned until dropped, when it is released (`rd_kafka_message_destroy`, which librdkafka
/// allows from any thread).
///
/// The message lives in its consumer's memory, so the consumer must outlive it: whoever
/// holds messages also holds the consumer (in an `Arc`) and drops its messages first.
pub struct Held(NonNull<rdsys::rd_kafka_message_t>);

// SAFETY: a librdkafka message is read by one owner at a time and may be destroyed on any
// thread; nothing in it is tied to the thread that fetched it.
unsafe impl Send for Held {}

impl Held {
    /// # Safety
    /// `message` is a message librdkafka returned, owned by nobody else (it is destroyed
    /// when the value is dropped), and its consumer outlives the returned value.
    pub unsafe fn from_raw(message: *mut rdsys::rd_kafka_message_t) -> Option<Self> {
        NonNull::new(message).map(Self)
    }

    fn raw(&self) -> &rdsys::rd_kafka_message_t {
        // SAFETY: valid until dropped (see `from_raw`).
        unsafe { self.0.as_ref() }
    }

    /// The error librdkafka delivered in place of a message, if it is one.
    pub fn error(&self) -> Option<String> {
        let err = self.raw().err;
        if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        // SAFETY: both return static or message-owned C strings, read before the message goes.
        let (name, detail) = unsafe {
            (
                CStr::from_ptr(rdsys::rd_kafka_err2str(err)).to_string_lossy(),
                CStr::from_ptr(rdsys::rd_kafka_message_errstr(self.0.as_ptr())).to_string_lossy(),
            )
        };
        Some(format!("{name}: {detail}"))
    }

    pub fn partition(&self) -> i32 {
        self.raw().partition
    }

    pub fn offset(&self) -> i64 {
        self.raw().offset
    }

    /// The topic's name (`None` if it is not UTF-8).
    pub fn topic(&self) -> Option<&str> {
        let rkt = self.raw().rkt;
        if rkt.is_null() {
            return None;
        }
        // SAFETY: the message holds a reference on its topic; the name lives as long.
        unsafe { CStr::from_ptr(rdsys::rd_kafka_topic_name(rkt)) }
            .to_str()
            .ok()
    }

    pub fn payload(&self) -> &[u8] {
        let m = self.raw();
        if m.payload.is_null() {
            return &[];
        }
        // SAFETY: librdkafka's (pointer, length) of the payload, valid while the message is.
        unsafe { std::slice::from_raw_parts(m.payload as *const u8, m.len) }
    }

    pub fn key(&self) -> Option<&[u8]> {
        let m = self.raw();
        if m.key.is_null() {
            return None;
        }
        // SAFETY: as for the payload.
        Some(unsafe { std::slice::from_raw_parts(m.key as *const u8, m.key_len) })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: owned (see `from_raw`), destroyed once.
        unsafe { rdsys::rd_kafka_message_destroy(self.0.as_ptr()) }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("partition", &self.partition())
            .field("offset", &self.offset())
            .field("len", &self.raw().len)
            .finish()
    }
}
