"""The AWS connectors, one module each, on one shared base.

    settings.py     AwsClientSettings: region, endpoint_url, timeouts, retry; every section below
                    inherits it, so [s3], [glue], [eventbridge] and [secretsmanager] stay flat
    client.py       aiobotocore sessions and clients (botocore's retries off, our timeouts)
    translate.py    botocore / aiohttp exceptions -> connectors.errors kinds
    connector.py    AwsConnector: owns the session, client start/close and translate+retry
    s3.py           S3Sink, the lake's ObjectSink on a bucket
    glue.py         GlueCatalog, tables and partitions in the Glue Data Catalog
    eventbridge.py  EventBridgePublisher (and its durable EventOutbox), one event per landed object
    secrets.py      SecretsManagerDeviceSource, the device keys

Nothing here imports the SDK at import time: it is the `s3` extra, loaded when a client is built.
"""
