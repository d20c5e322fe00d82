"""Cloud Map API conformance with the real boto3 client.

Run by `cargo test -p trellis-discovery` (tests/integration.rs), which starts the server on an
ephemeral port and passes its URL in TRELLIS_API_URL.
"""
import os
import uuid

import boto3
import botocore
import pytest

URL = os.environ["TRELLIS_API_URL"]


@pytest.fixture(scope="module")
def sd():
    return boto3.client(
        "servicediscovery",
        endpoint_url=URL,
        region_name="us-east-1",
        aws_access_key_id="AKIDTEST",
        aws_secret_access_key="secret",
        # DiscoverInstances targets the "data-" host prefix on AWS; a custom endpoint needs it off.
        config=botocore.config.Config(retries={"max_attempts": 1}, inject_host_prefix=False),
    )


def code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def status(excinfo):
    return excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]


def make_ns(sd, name=None, kind="private"):
    name = name or f"ns{uuid.uuid4().hex[:8]}.local"
    if kind == "http":
        op = sd.create_http_namespace(Name=name)
    elif kind == "public":
        op = sd.create_public_dns_namespace(Name=name)
    else:
        op = sd.create_private_dns_namespace(Name=name, Vpc="vpc-1")
    got = sd.get_operation(OperationId=op["OperationId"])["Operation"]
    assert got["Status"] == "SUCCESS"
    assert got["Type"] == "CREATE_NAMESPACE"
    return got["Targets"]["NAMESPACE"], name


def test_namespace_lifecycle(sd):
    ns_id, name = make_ns(sd)
    assert ns_id.startswith("ns-")
    ns = sd.get_namespace(Id=ns_id)["Namespace"]
    assert ns["Name"] == name and ns["Type"] == "DNS_PRIVATE"
    assert ns["Arn"] == f"arn:aws:servicediscovery:us-east-1:123456789012:namespace/{ns_id}"
    assert ns["ServiceCount"] == 0
    names = [n["Name"] for n in sd.list_namespaces()["Namespaces"]]
    assert name in names
    only_private = sd.list_namespaces(Filters=[{"Name": "TYPE", "Values": ["DNS_PRIVATE"], "Condition": "EQ"}])
    assert all(n["Type"] == "DNS_PRIVATE" for n in only_private["Namespaces"])
    with pytest.raises(sd.exceptions.NamespaceAlreadyExists):
        sd.create_private_dns_namespace(Name=name, Vpc="vpc-1")
    op = sd.update_private_dns_namespace(
        Id=ns_id, Namespace={"Description": "d", "Properties": {"DnsProperties": {"SOA": {"TTL": 30}}}}
    )
    assert sd.get_operation(OperationId=op["OperationId"])["Operation"]["Status"] == "SUCCESS"
    ns = sd.get_namespace(Id=ns_id)["Namespace"]
    assert ns["Description"] == "d"
    assert ns["Properties"]["DnsProperties"]["SOA"]["TTL"] == 30
    sd.delete_namespace(Id=ns_id)
    with pytest.raises(sd.exceptions.NamespaceNotFound) as e:
        sd.get_namespace(Id=ns_id)
    assert status(e) == 404


def test_http_and_public_namespaces(sd):
    http_id, http_name = make_ns(sd, kind="http")
    assert sd.get_namespace(Id=http_id)["Namespace"]["Type"] == "HTTP"
    sd.update_http_namespace(Id=http_id, Namespace={"Description": "x"})
    pub_id, _ = make_ns(sd, name=f"pub{uuid.uuid4().hex[:6]}.example.com", kind="public")
    assert sd.get_namespace(Id=pub_id)["Namespace"]["Type"] == "DNS_PUBLIC"
    with pytest.raises(sd.exceptions.InvalidInput):
        sd.create_http_namespace(Name="has space")


def test_creator_request_id_idempotency(sd):
    name = f"idem{uuid.uuid4().hex[:6]}.local"
    a = sd.create_private_dns_namespace(Name=name, Vpc="vpc-1", CreatorRequestId="req-1" + name)
    b = sd.create_private_dns_namespace(Name=name, Vpc="vpc-1", CreatorRequestId="req-1" + name)
    assert a["OperationId"] == b["OperationId"]


def test_service_and_instances(sd):
    ns_id, ns_name = make_ns(sd)
    svc = sd.create_service(
        Name="api",
        NamespaceId=ns_id,
        DnsConfig={"RoutingPolicy": "MULTIVALUE", "DnsRecords": [{"Type": "A", "TTL": 10}, {"Type": "SRV", "TTL": 10}]},
        HealthCheckCustomConfig={"FailureThreshold": 1},
        Tags=[{"Key": "team", "Value": "core"}],
    )["Service"]
    assert svc["Id"].startswith("srv-")
    assert svc["Arn"].endswith(f":service/{svc['Id']}")
    assert svc["Type"] == "DNS_HTTP"
    with pytest.raises(sd.exceptions.ServiceAlreadyExists):
        sd.create_service(Name="api", NamespaceId=ns_id)
    assert sd.get_service(Id=svc["Id"])["Service"]["Name"] == "api"
    listed = sd.list_services(Filters=[{"Name": "NAMESPACE_ID", "Values": [ns_id], "Condition": "EQ"}])
    assert [s["Id"] for s in listed["Services"]] == [svc["Id"]]
    assert sd.get_namespace(Id=ns_id)["Namespace"]["ServiceCount"] == 1

    for i in range(3):
        op = sd.register_instance(
            ServiceId=svc["Id"],
            InstanceId=f"i-{i}",
            Attributes={"AWS_INSTANCE_IPV4": f"10.0.0.{i + 1}", "AWS_INSTANCE_PORT": "8080", "version": "v1" if i else "v2"},
        )
        o = sd.get_operation(OperationId=op["OperationId"])["Operation"]
        assert o["Type"] == "REGISTER_INSTANCE" and o["Targets"]["INSTANCE"] == f"i-{i}"
    with pytest.raises(sd.exceptions.InvalidInput):
        sd.register_instance(ServiceId=svc["Id"], InstanceId="bad", Attributes={"AWS_INSTANCE_PORT": "1"})
    with pytest.raises(sd.exceptions.InvalidInput):
        sd.register_instance(ServiceId=svc["Id"], InstanceId="bad", Attributes={"AWS_INSTANCE_IPV4": "999.1.1.1", "AWS_INSTANCE_PORT": "1"})
    inst = sd.get_instance(ServiceId=svc["Id"], InstanceId="i-1")["Instance"]
    assert inst["Attributes"]["AWS_INSTANCE_IPV4"] == "10.0.0.2"
    page1 = sd.list_instances(ServiceId=svc["Id"], MaxResults=2)
    assert len(page1["Instances"]) == 2 and "NextToken" in page1
    page2 = sd.list_instances(ServiceId=svc["Id"], MaxResults=2, NextToken=page1["NextToken"])
    assert len(page2["Instances"]) == 1 and "NextToken" not in page2
    paginator = sd.get_paginator("list_instances")
    assert sum(len(p["Instances"]) for p in paginator.paginate(ServiceId=svc["Id"], PaginationConfig={"PageSize": 1})) == 3

    d = sd.discover_instances(NamespaceName=ns_name, ServiceName="api")
    assert len(d["Instances"]) == 3
    rev = d["InstancesRevision"]
    assert sd.discover_instances_revision(NamespaceName=ns_name, ServiceName="api")["InstancesRevision"] == rev
    assert {i["HealthStatus"] for i in d["Instances"]} == {"HEALTHY"}
    q = sd.discover_instances(NamespaceName=ns_name, ServiceName="api", QueryParameters={"version": "v1"})
    assert sorted(i["InstanceId"] for i in q["Instances"]) == ["i-1", "i-2"]
    o = sd.discover_instances(NamespaceName=ns_name, ServiceName="api", OptionalParameters={"version": "v3"})
    assert len(o["Instances"]) == 3
    o = sd.discover_instances(NamespaceName=ns_name, ServiceName="api", OptionalParameters={"version": "v2"})
    assert [i["InstanceId"] for i in o["Instances"]] == ["i-0"]
    assert len(sd.discover_instances(NamespaceName=ns_name, ServiceName="api", MaxResults=1)["Instances"]) == 1

    sd.update_instance_custom_health_status(ServiceId=svc["Id"], InstanceId="i-0", Status="UNHEALTHY")
    st = sd.get_instances_health_status(ServiceId=svc["Id"])["Status"]
    assert st == {"i-0": "UNHEALTHY", "i-1": "HEALTHY", "i-2": "HEALTHY"}
    healthy = sd.discover_instances(NamespaceName=ns_name, ServiceName="api", HealthStatus="HEALTHY")
    assert sorted(i["InstanceId"] for i in healthy["Instances"]) == ["i-1", "i-2"]
    unhealthy = sd.discover_instances(NamespaceName=ns_name, ServiceName="api", HealthStatus="UNHEALTHY")
    assert [i["InstanceId"] for i in unhealthy["Instances"]] == ["i-0"]
    assert sd.discover_instances_revision(NamespaceName=ns_name, ServiceName="api")["InstancesRevision"] > rev
    for i in ("i-1", "i-2"):
        sd.update_instance_custom_health_status(ServiceId=svc["Id"], InstanceId=i, Status="UNHEALTHY")
    fallback = sd.discover_instances(NamespaceName=ns_name, ServiceName="api", HealthStatus="HEALTHY_OR_ELSE_ALL")
    assert len(fallback["Instances"]) == 3

    with pytest.raises(sd.exceptions.ResourceInUse) as e:
        sd.delete_service(Id=svc["Id"])
    assert status(e) == 409
    with pytest.raises(sd.exceptions.ResourceInUse):
        sd.delete_namespace(Id=ns_id)
    for i in range(3):
        sd.deregister_instance(ServiceId=svc["Id"], InstanceId=f"i-{i}")
    with pytest.raises(sd.exceptions.InstanceNotFound):
        sd.deregister_instance(ServiceId=svc["Id"], InstanceId="i-0")
    with pytest.raises(sd.exceptions.InstanceNotFound):
        sd.get_instance(ServiceId=svc["Id"], InstanceId="i-0")

    tags = sd.list_tags_for_resource(ResourceARN=svc["Arn"])["Tags"]
    assert tags == [{"Key": "team", "Value": "core"}]
    sd.tag_resource(ResourceARN=svc["Arn"], Tags=[{"Key": "env", "Value": "dev"}])
    sd.untag_resource(ResourceARN=svc["Arn"], TagKeys=["team"])
    assert sd.list_tags_for_resource(ResourceARN=svc["Arn"])["Tags"] == [{"Key": "env", "Value": "dev"}]
    with pytest.raises(sd.exceptions.ResourceNotFoundException):
        sd.list_tags_for_resource(ResourceARN=svc["Arn"] + "x")

    op = sd.update_service(Id=svc["Id"], Service={"Description": "new", "DnsConfig": {"DnsRecords": [{"Type": "A", "TTL": 5}]}})
    assert sd.get_operation(OperationId=op["OperationId"])["Operation"]["Type"] == "UPDATE_SERVICE"
    got = sd.get_service(Id=svc["Id"])["Service"]
    assert got["Description"] == "new" and got["DnsConfig"]["DnsRecords"] == [{"Type": "A", "TTL": 5}]
    sd.delete_service(Id=svc["Id"])
    with pytest.raises(sd.exceptions.ServiceNotFound):
        sd.get_service(Id=svc["Id"])
    sd.delete_namespace(Id=ns_id)


def test_service_attributes(sd):
    ns_id, _ = make_ns(sd, kind="http")
    svc = sd.create_service(Name="attrs", NamespaceId=ns_id)["Service"]
    got = sd.get_service_attributes(ServiceId=svc["Id"])["ServiceAttributes"]
    assert got["ServiceArn"] == svc["Arn"] and got["Attributes"] == {}
    assert got["ResourceOwner"]
    sd.update_service_attributes(ServiceId=svc["Id"], Attributes={"team": "core", "tier": "1"})
    # Later updates add and overwrite; the ARN names the service too.
    sd.update_service_attributes(ServiceId=svc["Arn"], Attributes={"tier": "2", "owner": "ops@example.com"})
    got = sd.get_service_attributes(ServiceId=svc["Id"])["ServiceAttributes"]["Attributes"]
    assert got == {"team": "core", "tier": "2", "owner": "ops@example.com"}
    # Deleting keys the service lacks is not an error.
    sd.delete_service_attributes(ServiceId=svc["Id"], Attributes=["team", "never-set"])
    got = sd.get_service_attributes(ServiceId=svc["Id"])["ServiceAttributes"]["Attributes"]
    assert got == {"tier": "2", "owner": "ops@example.com"}
    # Attributes are not instance data: the service itself is unchanged.
    assert "Attributes" not in sd.get_service(Id=svc["Id"])["Service"]

    # 30 at most, counting the ones already there; a refused update changes nothing.
    with pytest.raises(sd.exceptions.ServiceAttributesLimitExceededException) as e:
        sd.update_service_attributes(ServiceId=svc["Id"], Attributes={f"k{i}": "v" for i in range(29)})
    assert status(e) == 400
    got = sd.get_service_attributes(ServiceId=svc["Id"])["ServiceAttributes"]["Attributes"]
    assert len(got) == 2
    sd.update_service_attributes(ServiceId=svc["Id"], Attributes={f"k{i}": "v" for i in range(28)})
    assert len(sd.get_service_attributes(ServiceId=svc["Id"])["ServiceAttributes"]["Attributes"]) == 30

    with pytest.raises(sd.exceptions.InvalidInput):
        sd.update_service_attributes(ServiceId=svc["Id"], Attributes={"k0": "x" * 1025})
    with pytest.raises(sd.exceptions.InvalidInput):
        sd.update_service_attributes(ServiceId=svc["Id"], Attributes={"": "x"})
    with pytest.raises(sd.exceptions.ServiceNotFound):
        sd.get_service_attributes(ServiceId="srv-doesnotexist")
    with pytest.raises(sd.exceptions.ServiceNotFound):
        sd.update_service_attributes(ServiceId="srv-doesnotexist", Attributes={"a": "b"})
    with pytest.raises(sd.exceptions.ServiceNotFound):
        sd.delete_service_attributes(ServiceId="srv-doesnotexist", Attributes=["a"])


def test_custom_health_requires_custom_config(sd):
    ns_id, _ = make_ns(sd, kind="http")
    svc = sd.create_service(Name="plain", NamespaceId=ns_id)["Service"]
    assert svc["Type"] == "HTTP"
    sd.register_instance(ServiceId=svc["Id"], InstanceId="a", Attributes={"k": "v"})
    with pytest.raises(sd.exceptions.CustomHealthNotFound) as e:
        sd.update_instance_custom_health_status(ServiceId=svc["Id"], InstanceId="a", Status="HEALTHY")
    assert status(e) == 404
    assert sd.get_instances_health_status(ServiceId=svc["Id"])["Status"] == {"a": "UNKNOWN"}


def test_operations_and_errors(sd):
    ns_id, _ = make_ns(sd)
    ops = sd.list_operations(Filters=[{"Name": "NAMESPACE_ID", "Values": [ns_id], "Condition": "EQ"}])["Operations"]
    assert len(ops) == 1 and ops[0]["Status"] == "SUCCESS"
    ops = sd.list_operations(Filters=[{"Name": "TYPE", "Values": ["CREATE_NAMESPACE", "DELETE_NAMESPACE"], "Condition": "IN"}])
    assert len(ops["Operations"]) >= 1
    with pytest.raises(sd.exceptions.OperationNotFound):
        sd.get_operation(OperationId="nope")
    with pytest.raises(sd.exceptions.ServiceNotFound):
        sd.get_service(Id="srv-doesnotexist")
    with pytest.raises(sd.exceptions.NamespaceNotFound):
        sd.create_service(Name="x", NamespaceId="ns-doesnotexist")
    with pytest.raises(sd.exceptions.NamespaceNotFound):
        sd.discover_instances(NamespaceName="nope.local", ServiceName="x")
    with pytest.raises(sd.exceptions.InvalidInput):
        sd.list_namespaces(NextToken="garbage")
    with pytest.raises(sd.exceptions.InvalidInput):
        sd.create_service(Name="bad name", NamespaceId=ns_id)
