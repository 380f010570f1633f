"""The tenant's side of a KMIP server for the tests, through PyKMIP's own
client: create an AES-256 key usable for Encrypt/Decrypt and activate it,
revoke it (deactivated or compromised), destroy it.

usage: kmip_admin.py DIR PORT create [COUNT] | revoke UID | compromise UID | destroy UID
DIR holds ca.pem, client.pem and client.key."""
import sys

from kmip import enums
from kmip.pie.client import ProxyKmipClient


def main(directory, port, command, uid=None):
    client = ProxyKmipClient(
        hostname="127.0.0.1",
        port=int(port),
        cert=f"{directory}/client.pem",
        key=f"{directory}/client.key",
        ca=f"{directory}/ca.pem",
        config_file="/dev/null",
        kmip_version=enums.KMIPVersion.KMIP_1_4,
    )
    with client:
        if command == "create":
            for _ in range(int(uid or 1)):
                created = client.create(
                    enums.CryptographicAlgorithm.AES,
                    256,
                    cryptographic_usage_mask=[
                        enums.CryptographicUsageMask.ENCRYPT,
                        enums.CryptographicUsageMask.DECRYPT,
                    ],
                )
                client.activate(created)
                print(created)
        elif command == "revoke":
            client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
        elif command == "compromise":
            client.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, uid)
        elif command == "destroy":
            client.destroy(uid)
        else:
            raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(*sys.argv[1:])
