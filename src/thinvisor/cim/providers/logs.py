"""The agent's event log as a Record Log (DSP1010) in root/cimv2.

One ``TV_RecordLog`` (the event log), a ``TV_LogEntry`` for each of its newest
``MAX_RECORDS`` events, ``TV_UseOfLog`` from the log to the host and
``TV_LogManagesRecord`` from the log to each entry.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from pywbem import CIMDateTime, CIMInstance, CIMInstanceName

from thinvisor.cim.provider import CIMV2, CimContext, InstanceProvider
from thinvisor.cim.providers.base import FunctionProvider, host_path, make_instance
from thinvisor.host.events import Event

LOG_CLASS = "TV_RecordLog"
ENTRY_CLASS = "TV_LogEntry"
LOG_ID = "thinvisor:eventlog"
LOG_NAME = "thinvisor event log"
MAX_RECORDS = 1000

# PerceivedSeverity: 2 Information, 3 Degraded/Warning, 5 Major
_INFORMATION, _WARNING, _MAJOR = 2, 3, 5


def log_path() -> CIMInstanceName:
    """The path of the event log's ``TV_RecordLog``."""
    return CIMInstanceName(LOG_CLASS, {"InstanceID": LOG_ID}, namespace=CIMV2)


def entry_path(event_id: int) -> CIMInstanceName:
    """The path of one event's ``TV_LogEntry``."""
    keys = {"InstanceID": f"thinvisor:event:{event_id}"}
    return CIMInstanceName(ENTRY_CLASS, keys, namespace=CIMV2)


async def _events(ctx: CimContext) -> list[Event]:
    if ctx.agent is None:
        return []
    # The log is a file read backwards: keep it off the event loop.
    return await asyncio.to_thread(ctx.agent.events.list, limit=MAX_RECORDS)


async def record_logs(ctx: CimContext) -> list[CIMInstance]:
    count = len(await _events(ctx))
    properties = {
        "InstanceID": LOG_ID,
        "Name": LOG_NAME,
        "ElementName": LOG_NAME,
        "MaxNumberOfRecords": MAX_RECORDS,
        "CurrentNumberOfRecords": count,
        "OverwritePolicy": 2,  # Wraps When Full: the oldest records go first
        "LogState": 2,  # Normal
        "EnabledState": 2,  # Enabled
        "RequestedState": 12,  # Not Applicable
        "OperationalStatus": [2],  # OK
        "HealthState": 5,  # OK
    }
    return [make_instance(ctx.repository, LOG_CLASS, properties)]


def _severity(kind: str) -> int:
    if any(word in kind for word in ("fail", "error", "crash")):
        return _MAJOR
    if any(word in kind for word in ("warn", "dropped", "lost")):
        return _WARNING
    return _INFORMATION


def _timestamp(event: Event) -> CIMDateTime:
    return CIMDateTime(datetime.fromisoformat(event.time.replace("Z", "+00:00")))


def _entry(ctx: CimContext, event: Event) -> CIMInstance:
    record = {"object": event.object, "user": event.user, "data": event.data}
    properties = {
        "InstanceID": entry_path(event.id)["InstanceID"],
        "LogInstanceID": LOG_ID,
        "LogName": LOG_NAME,
        "RecordID": str(event.id),
        "CreationTimeStamp": _timestamp(event),
        "MessageID": event.kind,
        "Message": event.message,
        "ElementName": event.kind,
        "OwningEntity": "thinvisor",
        "PerceivedSeverity": _severity(event.kind),
        "RecordFormat": "application/json",
        "RecordData": json.dumps(record, sort_keys=True, default=str),
    }
    return make_instance(ctx.repository, ENTRY_CLASS, properties)


async def log_entries(ctx: CimContext) -> list[CIMInstance]:
    return [_entry(ctx, event) for event in await _events(ctx)]


async def uses_of_log(ctx: CimContext) -> list[CIMInstance]:
    refs = {"Antecedent": log_path(), "Dependent": host_path()}
    return [make_instance(ctx.repository, "TV_UseOfLog", refs)]


async def log_records(ctx: CimContext) -> list[CIMInstance]:
    return [
        make_instance(
            ctx.repository,
            "TV_LogManagesRecord",
            {"Log": log_path(), "Record": entry_path(event.id)},
        )
        for event in await _events(ctx)
    ]


def providers() -> list[InstanceProvider]:
    """The Record Log profile's providers."""
    return [
        FunctionProvider(LOG_CLASS, CIMV2, record_logs),
        FunctionProvider(ENTRY_CLASS, CIMV2, log_entries),
        FunctionProvider("TV_UseOfLog", CIMV2, uses_of_log),
        FunctionProvider("TV_LogManagesRecord", CIMV2, log_records),
    ]
