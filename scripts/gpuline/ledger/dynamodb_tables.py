"""The DynamoDB ledger's four tables: their schema, their creation on first use, and the API calls
every part of the ledger goes through (:class:`DynamoTables`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from gpuline.adaptors import aws
from gpuline.errors import InfraError
from gpuline.ledger.contention import Retry
from gpuline.ledger.dynamodb_items import Item, start_key

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

T = TypeVar("T")

TABLES = ("runs", "events", "quota", "leases")
# Codes that mean "another writer won": the caller reads again and retries, they are not failures.
RACE_CODES = frozenset({"ConditionalCheckFailedException", "TransactionCanceledException", "TransactionConflict"})

# (attribute, type, key role) per table.
_KEYS: dict[str, list[tuple[str, str, str]]] = {
    "runs": [("run_id", "S", "HASH")],
    "events": [("run_id", "S", "HASH"), ("seq", "N", "RANGE")],
    "quota": [("pk", "S", "HASH")],
    "leases": [("lease_id", "S", "HASH")],
}
# Newest runs of one model first, without scanning every run.
_BY_MODEL = {
    "IndexName": "by_model",
    "KeySchema": [
        {"AttributeName": "model", "KeyType": "HASH"},
        {"AttributeName": "created_at", "KeyType": "RANGE"},
    ],
    "Projection": {"ProjectionType": "ALL"},
}


def table_names(prefix: str) -> dict[str, str]:
    return {name: f"{prefix}-{name}" for name in TABLES}


def table_definition(name: str, table: str) -> dict[str, Any]:
    """CreateTable's arguments for the ledger table ``name``, called ``table``."""
    attributes = {(a, t) for a, t, _ in _KEYS[name]}
    extra: dict[str, Any] = {}
    if name == "runs":
        attributes |= {("model", "S"), ("created_at", "S")}
        extra["GlobalSecondaryIndexes"] = [_BY_MODEL]
    return {
        "TableName": table,
        "KeySchema": [{"AttributeName": a, "KeyType": k} for a, _, k in _KEYS[name]],
        "AttributeDefinitions": [{"AttributeName": a, "AttributeType": t} for a, t in sorted(attributes)],
        "BillingMode": "PAY_PER_REQUEST",
        **extra,
    }


def ensure_tables(db: DynamoDBClient, tables: dict[str, str]) -> None:
    """Create the tables that are missing and wait until they are active.

    Tables are created in the order of TABLES, the leases table last: when it exists, so do the
    others, and every later open costs one call. SDK failures (no connection) are raised as they are.
    """
    if _exists(db, tables["leases"]):
        return
    created = []
    for name, table in tables.items():
        if not _exists(db, table):
            _create(db, name, table)
            created.append(table)
    for table in created:
        db.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})


def _exists(db: DynamoDBClient, table: str) -> bool:
    try:
        db.describe_table(TableName=table)
        return True
    except Exception as exc:
        if not aws.is_service_error(exc):
            raise
        if aws.error_code(exc) != "ResourceNotFoundException":
            raise InfraError(
                f"cannot describe DynamoDB table {table}: {aws.error_code(exc) or exc}",
                hint="check the credentials, the region and dynamodb:DescribeTable",
            ) from None
        return False


def _create(db: DynamoDBClient, name: str, table: str) -> None:
    try:
        db.create_table(**table_definition(name, table))
    except Exception as exc:
        if not aws.is_service_error(exc):
            raise
        if aws.error_code(exc) != "ResourceInUseException":  # another process is creating it
            raise InfraError(
                f"cannot create DynamoDB table {table}: {aws.error_code(exc) or exc}",
                hint="create the tables up front or allow dynamodb:CreateTable",
            ) from None


class DynamoTables:
    """The ledger's API calls: failures other than lost races become an InfraError naming the tables."""

    prefix: str
    tables: dict[str, str]
    _db: DynamoDBClient

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        """Call ``attempt`` until it stops raising Retry (the ledger decides for how long)."""
        raise NotImplementedError

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Run one API call; failures other than lost races become an InfraError naming the table."""
        try:
            return fn(**kwargs)
        except Exception as exc:
            if aws.is_service_error(exc):
                code = aws.error_code(exc)
                if code in RACE_CODES:
                    raise
                hint = "check the AWS credentials, region and IAM actions (docs/cost-and-policy.md, from the README)"
                if code == "ResourceNotFoundException":
                    hint = "the table is missing: let gpuline create it (needs dynamodb:CreateTable) or create it"
                raise InfraError(f"DynamoDB {what} failed on {self.prefix}-*: {code or exc}", hint=hint) from None
            if aws.is_sdk_error(exc):
                raise InfraError(f"DynamoDB {what} failed: {exc}", hint=aws.NETWORK_HINT) from None
            raise

    def _scan(self, table: str, **kwargs: Any) -> Iterator[Item]:
        start: dict[str, Any] | None = None
        while True:
            page = self._call("scan", self._db.scan, TableName=table, ConsistentRead=True, **kwargs, **start_key(start))
            yield from page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return

    def _query(self, table: str, **kwargs: Any) -> Iterator[Item]:
        start: dict[str, Any] | None = None
        while True:
            page = self._call("query", self._db.query, TableName=table, **kwargs, **start_key(start))
            yield from page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return

    def _get(self, table: str, key: Item) -> Item | None:
        page = self._call("get", self._db.get_item, TableName=table, Key=key, ConsistentRead=True)
        item: Item | None = page.get("Item")
        return item

    def _put_new(self, what: str, table: str, item: Item, condition: str) -> bool:
        """Put ``item`` if ``condition`` holds; False when it does not (the item already exists)."""
        try:
            self._call(what, self._db.put_item, TableName=self.tables[table], Item=item, ConditionExpression=condition)
        except Exception as exc:
            if aws.error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def _put_versioned(self, what: str, table: str, item: Item, version: int) -> None:
        """Write ``item`` only if the stored one is still at ``version``; Retry when another writer won."""
        try:
            self._call(
                what,
                self._db.put_item,
                TableName=self.tables[table],
                Item=item,
                ConditionExpression="version = :v",
                ExpressionAttributeValues={":v": {"N": str(version)}},
            )
        except Exception as exc:
            if aws.error_code(exc) == "ConditionalCheckFailedException":
                raise Retry from None
            raise
