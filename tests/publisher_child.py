"""A daemon stand-in for SIGKILL tests: stores synthetic results, reports, then waits.

Usage: publisher_child.py PORT OUTBOX TOPIC_PREFIX COUNT

Prints ``ready`` once connected or after 2 s without a broker, then waits for a line on
standard input. Prints ``stored N`` once N results are committed to the outbox, then keeps
the publisher running until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from mqtt_helpers import synthetic_result

from edge.config import MqttConfig
from edge.publisher import MqttPublisher


async def _main(port: int, outbox: Path, prefix: str, count: int) -> None:
    config = MqttConfig(
        host="127.0.0.1",
        port=port,
        topic_prefix=prefix,
        reconnect_min_delay=0.2,
        reconnect_max_delay=2.0,
    )
    publisher = MqttPublisher(config, "kill-pi", outbox)
    await publisher.start()
    await publisher.wait_connected(2.0)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for seq in range(count):
        await publisher.publish_frame(synthetic_result(seq))
    print(f"stored {count}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
