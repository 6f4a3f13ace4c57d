"""Which partitions are cut off, read from librdkafka statistics (shapes as a 2.16 client reports them)."""

from streamer.kafka.reachability import unreachable


def stats(brokers: dict[str, tuple[int, str]], leaders: dict[tuple[str, int], int]) -> dict:
    topics: dict = {}
    for (topic, partition), leader in leaders.items():
        partitions = topics.setdefault(topic, {"partitions": {"-1": {"leader": -1}}})["partitions"]
        partitions[str(partition)] = {"leader": leader}
    return {"brokers": {name: {"nodeid": node, "state": state} for name, (node, state) in brokers.items()},
            "topics": topics}


def test_partitions_led_by_a_connected_broker_are_reachable() -> None:
    report = stats({"host:9092/1": (1, "UP"), "GroupCoordinator": (-1, "UP")}, {("t", 0): 1, ("t", 1): 1})
    assert unreachable(report) == frozenset()


def test_during_a_broker_outage_leaders_are_unknown_and_every_partition_is_cut_off() -> None:
    report = stats({"host:9092/bootstrap": (-1, "INIT"), "GroupCoordinator": (-1, "INIT")},
                   {("t", 0): -1, ("t", 1): -1})
    assert unreachable(report) == {("t", 0), ("t", 1)}


def test_a_partition_whose_known_leader_is_not_connected_is_cut_off() -> None:
    report = stats({"a:9092/1": (1, "UP"), "b:9092/2": (2, "CONNECT")}, {("t", 0): 1, ("t", 1): 2})
    assert unreachable(report) == {("t", 1)}


def test_no_statistics_yet_cuts_nothing_off() -> None:
    assert unreachable({}) == frozenset()
