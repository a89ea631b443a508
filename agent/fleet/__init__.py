"""Fleet (device side): protocol, MQTT link, transfer, delta, telemetry, outbox."""
