// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

/// @title HeraldTest
/// @notice Emits the events herald's tests and demo subscribe to.
/// Every Transfer carries a global sequence number as its value, so a consumer can prove
/// exactly-once, in-order delivery by checking that the values it reads are 0, 1, 2, ...
contract HeraldTest {
    event Transfer(address indexed from, address indexed to, uint256 value);
    event Note(uint256 indexed seq, string text, bytes payload, uint256[] values);

    uint256 public transferCount;
    uint256 public noteCount;

    /// @notice Emits `n` Transfer events; the k-th one ever emitted is
    /// Transfer(address(0x1000 + k), address(0x2000 + k), k).
    function emitMany(uint256 n) external {
        uint256 seq = transferCount;
        for (uint256 i = 0; i < n; i++) {
            emit Transfer(address(uint160(0x1000 + seq)), address(uint160(0x2000 + seq)), seq);
            seq++;
        }
        transferCount = seq;
    }

    /// @notice Emits one Note with dynamic-type arguments.
    function emitNote(string calldata text, bytes calldata payload, uint256[] calldata values) external {
        emit Note(noteCount, text, payload, values);
        noteCount++;
    }

    /// @notice Emits a log with Transfer's topics but one byte of data, which no decoder
    /// for Transfer(address,address,uint256) can decode. Does not consume a sequence number.
    function emitMalformedTransfer() external {
        bytes32 topic0 = keccak256("Transfer(address,address,uint256)");
        assembly {
            mstore(0x00, 0xff00000000000000000000000000000000000000000000000000000000000000)
            log3(0x00, 1, topic0, 0xdead, 0xbeef)
        }
    }
}
