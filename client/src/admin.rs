//! [`Admin`]: topics, groups and offsets, as typed calls. Admin calls are safe to repeat, so
//! they retry retriable errors up to the client's retry deadline.

use sluice_protocol::ErrorCode;
use sluice_protocol::messages::*;
use sluice_protocol::{Request, Response};

use crate::client::Client;
use crate::error::{Error, Result};

/// Admin operations. Get one from [`Client::admin`].
#[derive(Clone, Debug)]
pub struct Admin {
    client: Client,
}

impl Client {
    /// Admin operations on this client.
    pub fn admin(&self) -> Admin {
        Admin {
            client: self.clone(),
        }
    }
}

fn fail(code: ErrorCode, message: Option<String>, what: String) -> Error {
    Error::Broker {
        code,
        message: Some(match message {
            Some(message) => format!("{what}: {message}"),
            None => what,
        }),
    }
}

fn check(code: ErrorCode, message: Option<String>, what: impl FnOnce() -> String) -> Result<()> {
    if code == ErrorCode::None {
        Ok(())
    } else {
        Err(fail(code, message, what()))
    }
}

impl Admin {
    async fn call(&self, request: impl Into<Request>) -> Result<Response> {
        self.client.send_with_retry(request).await
    }

    /// Creates a topic with `partitions` partitions and per-topic config overrides
    /// (`retention_ms`, `segment_bytes`, `max_message_bytes`, ...).
    ///
    /// # Errors
    /// `Broker { code: TopicAlreadyExists | InvalidTopicName | InvalidPartitions | ... }`.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: &[(&str, &str)],
    ) -> Result<()> {
        let request = CreateTopicsRequest {
            topics: vec![CreateTopic {
                name: name.to_owned(),
                partitions,
                configs: configs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            }],
            validate_only: false,
        };
        let (Response::CreateTopics(response), repeated) =
            self.client.send_with_retry_telling(request).await?
        else {
            return Err(Error::Usage("unexpected response to CreateTopics".into()));
        };
        let result = response
            .results
            .into_iter()
            .next()
            .ok_or_else(|| Error::Usage("empty CreateTopics response".into()))?;
        // A repeat finding the topic there: the attempt whose answer was lost created it.
        if repeated && result.error_code == ErrorCode::TopicAlreadyExists {
            return Ok(());
        }
        check(result.error_code, result.error_message, || {
            format!("create topic {name}")
        })
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let (Response::DeleteTopics(response), repeated) = self
            .client
            .send_with_retry_telling(DeleteTopicsRequest {
                names: vec![name.to_owned()],
            })
            .await?
        else {
            return Err(Error::Usage("unexpected response to DeleteTopics".into()));
        };
        let result = response
            .results
            .into_iter()
            .next()
            .ok_or_else(|| Error::Usage("empty DeleteTopics response".into()))?;
        // A repeat finding no topic: the attempt whose answer was lost deleted it.
        if repeated && result.error_code == ErrorCode::UnknownTopic {
            return Ok(());
        }
        check(result.error_code, None, || format!("delete topic {name}"))
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicListing>> {
        let Response::ListTopics(response) = self.call(ListTopicsRequest {}).await? else {
            return Err(Error::Usage("unexpected response to ListTopics".into()));
        };
        Ok(response.topics)
    }

    /// Partitions (start, end, size, segments) and effective configuration of a topic.
    pub async fn describe_topic(&self, name: &str) -> Result<DescribeTopicResponse> {
        let Response::DescribeTopic(response) = self
            .call(DescribeTopicRequest {
                name: name.to_owned(),
            })
            .await?
        else {
            return Err(Error::Usage("unexpected response to DescribeTopic".into()));
        };
        check(response.error_code, None, || {
            format!("describe topic {name}")
        })?;
        Ok(response)
    }

    /// The partition count of a topic.
    pub async fn partition_count(&self, name: &str) -> Result<u32> {
        let Response::Metadata(response) = self
            .call(MetadataRequest {
                topics: Some(vec![name.to_owned()]),
            })
            .await?
        else {
            return Err(Error::Usage("unexpected response to Metadata".into()));
        };
        let topic = response
            .topics
            .into_iter()
            .next()
            .ok_or_else(|| Error::Usage("empty Metadata response".into()))?;
        check(topic.error_code, None, || format!("topic {name}"))?;
        Ok(topic.partitions.len() as u32)
    }

    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let Response::ListGroups(response) = self.call(ListGroupsRequest {}).await? else {
            return Err(Error::Usage("unexpected response to ListGroups".into()));
        };
        Ok(response.groups)
    }

    /// Members, assignment, committed offsets and lag of a group.
    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse> {
        let Response::DescribeGroup(response) = self
            .call(DescribeGroupRequest {
                group_id: group.to_owned(),
            })
            .await?
        else {
            return Err(Error::Usage("unexpected response to DescribeGroup".into()));
        };
        check(response.error_code, None, || {
            format!("describe group {group}")
        })?;
        Ok(response)
    }

    /// One offset of one partition: earliest, latest, or the first at or after a timestamp
    /// (with that record's timestamp; -1 when none is that late).
    pub async fn list_offset(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<(u64, i64)> {
        let request = ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: topic.to_owned(),
                partitions: vec![ListOffsetsPartition { partition, spec }],
            }],
        };
        let Response::ListOffsets(response) = self.call(request).await? else {
            return Err(Error::Usage("unexpected response to ListOffsets".into()));
        };
        let entry = response
            .topics
            .into_iter()
            .next()
            .and_then(|topic| topic.partitions.into_iter().next())
            .ok_or_else(|| Error::Usage("empty ListOffsets response".into()))?;
        check(entry.error_code, None, || {
            format!("list offsets of {topic}/{partition}")
        })?;
        Ok((entry.offset, entry.timestamp))
    }
}
