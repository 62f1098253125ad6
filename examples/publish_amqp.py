"""Publish one message to wsfanout through RabbitMQ, as a backend would.

    python examples/publish_amqp.py "deploy finished"

It reads the broker and the queue from the variables the nodes read (WSFANOUT_AMQP_URL,
WSFANOUT_AMQP_QUEUE), and declares the queue exactly as every node declares it (durable,
no arguments) before publishing: a message sent before any node has started waits in the
queue instead of vanishing, and neither declaration conflicts with the other.
"""

import asyncio
import json
import os
import sys

import aio_pika  # pip install aio-pika

URL = os.environ.get("WSFANOUT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("WSFANOUT_AMQP_QUEUE", "wsfanout")


async def main(text: str) -> None:
    connection = await aio_pika.connect_robust(URL)
    async with connection:
        channel = await connection.channel()  # publisher confirms: publish waits for the ack
        queue = await channel.declare_queue(QUEUE, durable=True)  # as the nodes declare it
        body = json.dumps({"type": "broadcast", "text": text, "from": "ci"})
        await channel.default_exchange.publish(
            aio_pika.Message(body.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
    print(f"published to {QUEUE!r}")


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "hello from RabbitMQ"))
