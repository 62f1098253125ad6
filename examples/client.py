import asyncio
import sys

from wsfanout.client import Client


async def main(url: str) -> None:
    async with Client(url, username="greg", password="Greg-demo") as chat:
        await chat.send({"type": "group", "group": "boys", "text": "hi from Python"})
        async for event in chat:  # reconnects and resumes by itself
            if event["type"] == "message":
                print(f"{event['from']}: {event['text']}")
            elif event["type"] == "resumed" and not event["recovered"]:
                # a stream whose history began anew (its server restarted) missed nothing
                missed = [stream for stream in event["lost"] if stream not in event["restarted"]]
                if missed:
                    print("missed messages in", missed)


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000/"))
