"""The stages of the service in the order data flows: parse (bytes to events or dead letters), events (one
consumed message to requests, window items and outcomes), window_stage (windows inside the service), writer
(outcomes to the sinks, then "fully written"), and app (the wiring, the consume loop and the shutdown order)."""
