// pgJDBC on encrypted columns through cmk-proxy (extended protocol; default
// prepareThreshold=5, so statements executed more often switch to a named
// server-side statement with binary transfer and no new Describe).
// Table `records` (created by the harness, see integration/README.md) has one
// protected column per declared type. With JDBC's own setters (setShort,
// setInt, setLong, setBigDecimal, setDouble, setBoolean, setObject(LocalDate,
// LocalDateTime, OffsetDateTime, UUID), setTimestamp(Instant), PGobject jsonb,
// setBytes, setNull; and the legacy setDate/setTimestamp, which pgJDBC sends
// untyped with the JVM's offset: '2024-02-29 +00'): for tenants acme and globex insert rows covering every
// type (NULLs, unicode, 1 KiB text, negative and extreme numbers, timestamptz
// with an offset), as a batch and one by one; read them back exactly and check
// the declared types in ResultSetMetaData and ParameterMetaData; update
// (tenant in WHERE; pinned to a session tenant set by the startup option and
// by SET through the extended protocol); upsert with ON CONFLICT DO UPDATE
// SET c = EXCLUDED.c; ciphertext at rest through a direct connection; one
// KM003 refusal; then revoke globex: KM001 naming the tenant while acme keeps
// working on the same connection and the same prepared statement, and restore.
// Env: DATABASE_URL (proxy), PGSSLROOTCERT, CMK_DIRECT_URL, CMK_REVOKE_CMD,
// CMK_RESTORE_CMD, CMK_REVOKED_TENANT (globex), CMK_OTHER_TENANT (acme).
// Build: javac -cp /usr/share/java/postgresql.jar -d build Encrypted.java
// Exits non-zero if any check fails; prints "java-encrypted: N passed, M failed, K skipped".

import java.math.BigDecimal;
import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ParameterMetaData;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Timestamp;
import java.sql.Types;
import java.time.Instant;
import java.time.LocalDate;
import java.time.LocalDateTime;
import java.time.OffsetDateTime;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Objects;
import java.util.Properties;
import java.util.UUID;

import org.postgresql.PGStatement;
import org.postgresql.util.PGobject;

public class Encrypted {
    interface Check {
        void run() throws Exception;
    }

    static int passed = 0, failed = 0, skipped = 0;

    static void check(String name, Check c) {
        try {
            c.run();
            passed++;
            System.out.println("ok   - " + name);
        } catch (Throwable e) {
            failed++;
            System.out.println("FAIL - " + name + ": " + e);
            e.printStackTrace(System.out);
        }
    }

    static void expect(Object got, Object want, String what) {
        if (!Objects.equals(got, want)) {
            throw new AssertionError(what + ":\n  expected " + want + "\n  got      " + got);
        }
    }

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null || v.isEmpty()) {
            System.err.println(name + " must be set");
            System.exit(2);
        }
        return v;
    }

    /** jdbc URL and properties from a postgres:// URL. */
    static Object[] jdbc(String url, boolean ssl) throws Exception {
        URI u = new URI(url);
        String db = u.getPath() == null ? "" : u.getPath().replaceFirst("^/", "");
        int port = u.getPort() == -1 ? 5432 : u.getPort();
        Properties props = new Properties();
        String userInfo = u.getRawUserInfo();
        if (userInfo != null) {
            String[] parts = userInfo.split(":", 2);
            props.setProperty("user", URLDecoder.decode(parts[0], StandardCharsets.UTF_8));
            if (parts.length > 1) {
                props.setProperty("password", URLDecoder.decode(parts[1], StandardCharsets.UTF_8));
            }
        }
        String sslmode = "prefer";
        if (u.getRawQuery() != null) {
            for (String kv : u.getRawQuery().split("&")) {
                String[] p = kv.split("=", 2);
                if (p[0].equals("sslmode") && p.length > 1) {
                    sslmode = p[1];
                }
            }
        }
        props.setProperty("sslmode", sslmode);
        String ca = System.getenv("PGSSLROOTCERT");
        if (ssl && ca != null && !ca.isEmpty()) {
            props.setProperty("sslrootcert", ca);
        }
        props.setProperty("prepareThreshold", "5");
        props.setProperty("connectTimeout", "20");
        props.setProperty("ApplicationName", "cmk-proxy-jdbc-encrypted");
        return new Object[] {"jdbc:postgresql://" + u.getHost() + ":" + port + "/" + db, props};
    }

    static String proxyUrl;
    static Properties proxyProps;

    static Connection proxy(String options) throws SQLException {
        Properties p = new Properties();
        p.putAll(proxyProps);
        if (options != null) {
            p.setProperty("options", options);
        }
        return DriverManager.getConnection(proxyUrl, p);
    }

    // ---- the data -------------------------------------------------------------

    static final String[] COLS = {"c_text", "c_varchar", "c_int2", "c_int4", "c_int8", "c_numeric", "c_float8",
        "c_bool", "c_date", "c_timestamp", "c_timestamptz", "c_uuid", "c_jsonb", "c_bytea"};
    static final List<String> TYPES = List.of("text", "varchar", "int2", "int4", "int8", "numeric", "float8", "bool",
        "date", "timestamp", "timestamptz", "uuid", "jsonb", "bytea");
    static final int[] SQL_TYPES = {Types.VARCHAR, Types.VARCHAR, Types.SMALLINT, Types.INTEGER, Types.BIGINT,
        Types.NUMERIC, Types.DOUBLE, Types.BOOLEAN, Types.DATE, Types.TIMESTAMP, Types.TIMESTAMP_WITH_TIMEZONE,
        Types.OTHER, Types.OTHER, Types.BINARY};
    static final String SELECT = "SELECT id, tenant_id, label, " + String.join(", ", COLS) + " FROM records";
    static final String INSERT = "INSERT INTO records (id, tenant_id, label, " + String.join(", ", COLS)
        + ") VALUES (" + String.join(", ", java.util.Collections.nCopies(3 + COLS.length, "?")) + ")";
    static final String BIG;
    static {
        StringBuilder b = new StringBuilder();
        for (int i = 0; i < 1024; i++) {
            b.append((char) ('A' + i % 26));
        }
        BIG = b.toString();
    }
    static final String JSON_DOC = "{\"name\": \"Zoë\", \"tags\": [\"a\", \"b\"], \"nested\": {\"n\": -1.5, \"ok\": true, \"none\": null}}";

    /** A jsonb value (bound as a PGobject of type jsonb). */
    record Json(String text) {}

    static UUID uuidOf(String t) {
        return UUID.fromString(t.equals("acme") ? "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" : "b1ffcd00-1d1c-4ef8-bb6d-6bb9bd380a22");
    }

    static int base(String t) {
        return t.equals("acme") ? 0 : 10;
    }

    static String fullText(String t) {
        return t + ": Zoë says 'hi' — 日本語 🐘 back\\slash";
    }

    static List<Object[]> rowsFor(String t) {
        int b = base(t);
        List<Object[]> rows = new ArrayList<>();
        rows.add(new Object[] {b + 1, t, "full", fullText(t), t + " varchar ✓", (short) -32768, Integer.MIN_VALUE,
            Long.MIN_VALUE, new BigDecimal("-12345.678900"), -0.1, true, LocalDate.of(2024, 2, 29),
            LocalDateTime.parse("2024-02-29T23:59:59.123456"), OffsetDateTime.parse("2024-06-01T12:34:56.789+05:30"),
            uuidOf(t), new Json(JSON_DOC), new byte[] {0, 1, 0x7f, (byte) 0x80, (byte) 0xff, 'C', 'M', 'K'}});
        Object[] nulls = new Object[3 + COLS.length];
        nulls[0] = b + 2;
        nulls[1] = t;
        nulls[2] = "nulls";
        rows.add(nulls);
        rows.add(new Object[] {b + 3, t, "extremes", BIG, "", (short) 32767, Integer.MAX_VALUE, Long.MAX_VALUE,
            new BigDecimal("123456789012345678901234567890.000000001"), 1e300, false, LocalDate.of(1970, 1, 1),
            LocalDateTime.parse("2000-01-01T00:00:00"), Instant.parse("1969-07-21T00:17:40Z"),
            new UUID(0, 0), new Json("[1, \"two\", null]"), new byte[0]});
        return rows;
    }

    static void bind(PreparedStatement ps, int i, int sqlType, Object v) throws SQLException {
        if (v == null) {
            ps.setNull(i, sqlType);
        } else if (v instanceof String s) {
            ps.setString(i, s);
        } else if (v instanceof Short s) {
            ps.setShort(i, s);
        } else if (v instanceof Integer n) {
            ps.setInt(i, n);
        } else if (v instanceof Long n) {
            ps.setLong(i, n);
        } else if (v instanceof BigDecimal d) {
            ps.setBigDecimal(i, d);
        } else if (v instanceof Double d) {
            ps.setDouble(i, d);
        } else if (v instanceof Boolean x) {
            ps.setBoolean(i, x);
        } else if (v instanceof LocalDate || v instanceof LocalDateTime || v instanceof OffsetDateTime) {
            ps.setObject(i, v);
        } else if (v instanceof Instant d) {
            ps.setTimestamp(i, Timestamp.from(d));
        } else if (v instanceof UUID u) {
            ps.setObject(i, u);
        } else if (v instanceof Json j) {
            PGobject o = new PGobject();
            o.setType("jsonb");
            o.setValue(j.text());
            ps.setObject(i, o);
        } else if (v instanceof byte[] bytes) {
            ps.setBytes(i, bytes);
        } else {
            throw new IllegalArgumentException("no binding for " + v.getClass());
        }
    }

    static void bindRow(PreparedStatement ps, Object[] row) throws SQLException {
        ps.setInt(1, (Integer) row[0]);
        ps.setString(2, (String) row[1]);
        bind(ps, 3, Types.VARCHAR, row[2]);
        for (int c = 0; c < COLS.length; c++) {
            bind(ps, 4 + c, SQL_TYPES[c], row[3 + c]);
        }
    }

    static String hex(byte[] b) {
        StringBuilder s = new StringBuilder("\\x");
        for (byte x : b) {
            s.append(String.format("%02x", x));
        }
        return s.toString();
    }

    /** A value's comparable text (the expected side). */
    static String shown(Object v) {
        if (v == null) {
            return "null";
        } else if (v instanceof BigDecimal d) {
            return d.toPlainString();
        } else if (v instanceof OffsetDateTime d) {
            return d.toInstant().toString();
        } else if (v instanceof Json j) {
            return j.text();
        } else if (v instanceof byte[] b) {
            return hex(b);
        }
        return v.toString();
    }

    /** Column `col` of declared type `type` read with the matching JDBC getter. */
    static String read(ResultSet rs, int col, String type) throws SQLException {
        Object v = switch (type) {
            case "int2" -> rs.getShort(col);
            case "int4" -> rs.getInt(col);
            case "int8" -> rs.getLong(col);
            case "numeric" -> rs.getBigDecimal(col);
            case "float8" -> rs.getDouble(col);
            case "bool" -> rs.getBoolean(col);
            case "date" -> rs.getObject(col, LocalDate.class);
            case "timestamp" -> rs.getObject(col, LocalDateTime.class);
            case "timestamptz" -> rs.getObject(col, OffsetDateTime.class);
            case "uuid" -> rs.getObject(col, UUID.class);
            case "bytea" -> rs.getBytes(col);
            default -> rs.getString(col);
        };
        return rs.wasNull() ? "null" : shown(v);
    }

    static List<String> readRow(ResultSet rs) throws SQLException {
        List<String> out = new ArrayList<>();
        out.add(Integer.toString(rs.getInt(1)));
        out.add(rs.getString(2));
        out.add(String.valueOf(rs.getString(3)));
        for (int c = 0; c < COLS.length; c++) {
            out.add(read(rs, 4 + c, TYPES.get(c)));
        }
        return out;
    }

    static List<String> shownRow(Object[] row) {
        List<String> out = new ArrayList<>();
        for (Object v : row) {
            out.add(v instanceof Instant i ? i.toString() : shown(v));
        }
        return out;
    }

    static List<List<String>> query(PreparedStatement ps) throws SQLException {
        List<List<String>> rows = new ArrayList<>();
        try (ResultSet rs = ps.executeQuery()) {
            while (rs.next()) {
                rows.add(readRow(rs));
            }
        }
        return rows;
    }

    static String sqlState(Check c) throws Exception {
        try {
            c.run();
        } catch (SQLException e) {
            return e.getSQLState() + " " + e.getMessage();
        }
        return "no error";
    }

    static void run(String cmd) throws Exception {
        Process p = new ProcessBuilder("sh", "-c", cmd).redirectErrorStream(true).start();
        String out = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
        if (p.waitFor() != 0) {
            throw new AssertionError(cmd + " failed: " + out);
        }
    }

    public static void main(String[] args) throws Exception {
        Object[] j = jdbc(env("DATABASE_URL"), true);
        proxyUrl = (String) j[0];
        proxyProps = (Properties) j[1];
        Object[] d = jdbc(env("CMK_DIRECT_URL"), false);
        String revokeCmd = env("CMK_REVOKE_CMD");
        String restoreCmd = env("CMK_RESTORE_CMD");
        String revoked = System.getenv().getOrDefault("CMK_REVOKED_TENANT", "globex");
        String other = System.getenv().getOrDefault("CMK_OTHER_TENANT", "acme");

        Connection c;
        Connection direct;
        try {
            c = proxy(null);
            direct = DriverManager.getConnection((String) d[0], (Properties) d[1]);
        } catch (SQLException e) {
            failed++;
            System.out.println("FAIL - connect: " + e);
            finish();
            return;
        }
        passed++;
        System.out.println("ok   - connect over TLS as scram_user (and directly to PostgreSQL)");

        check("insert rows of every type: acme as a batch, globex one by one (past prepareThreshold)", () -> {
            try (PreparedStatement ps = c.prepareStatement(INSERT)) {
                for (Object[] row : rowsFor("acme")) {
                    bindRow(ps, row);
                    ps.addBatch();
                }
                expect(Arrays.toString(ps.executeBatch()), "[1, 1, 1]", "batch counts");
                for (Object[] row : rowsFor("globex")) {
                    bindRow(ps, row);
                    expect(ps.executeUpdate(), 1, "insert count");
                }
            }
        });

        check("ParameterMetaData shows the declared types", () -> {
            try (PreparedStatement ps = c.prepareStatement(INSERT)) {
                ParameterMetaData md = ps.getParameterMetaData();
                List<String> got = new ArrayList<>();
                for (int i = 4; i <= md.getParameterCount(); i++) {
                    got.add(md.getParameterTypeName(i));
                }
                expect(got, TYPES, "parameter types");
            }
        });

        check("read back exactly, 7 executions of one PreparedStatement (server-prepared, binary)", () -> {
            try (PreparedStatement ps = c.prepareStatement(SELECT + " WHERE tenant_id = ? ORDER BY id")) {
                for (int round = 0; round < 7; round++) {
                    String t = round % 2 == 0 ? "acme" : "globex";
                    ps.setString(1, t);
                    try (ResultSet rs = ps.executeQuery()) {
                        ResultSetMetaData md = rs.getMetaData();
                        List<String> types = new ArrayList<>();
                        for (int i = 4; i <= md.getColumnCount(); i++) {
                            types.add(md.getColumnTypeName(i));
                        }
                        expect(types, TYPES, "declared types in ResultSetMetaData, round " + round);
                        List<List<String>> got = new ArrayList<>();
                        while (rs.next()) {
                            got.add(readRow(rs));
                        }
                        List<List<String>> want = new ArrayList<>();
                        for (Object[] row : rowsFor(t)) {
                            want.add(shownRow(row));
                        }
                        expect(got, want, t + " rows, round " + round);
                    }
                }
                expect(ps.unwrap(PGStatement.class).isUseServerPrepare(), true, "server-prepared after 5 executions");
            }
        });

        check("update with the tenant in WHERE", () -> {
            try (PreparedStatement ps = c.prepareStatement(
                    "UPDATE records SET c_text = ?, c_date = ? WHERE id = ? AND tenant_id = ?")) {
                ps.setString(1, "acme updated ✓");
                ps.setObject(2, LocalDate.of(2001, 9, 9));
                ps.setInt(3, 1);
                ps.setString(4, "acme");
                expect(ps.executeUpdate(), 1, "update count");
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT c_text, c_date, c_int4 FROM records WHERE id = ?")) {
                ps.setInt(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    expect(rs.getString(1) + "|" + rs.getDate(2) + "|" + rs.getInt(3),
                        "acme updated ✓|2001-09-09|" + Integer.MIN_VALUE, "updated row");
                }
            }
        });

        check("update pinned to the session tenant (startup options -c cmk.tenant_id=globex)", () -> {
            try (Connection c2 = proxy("-c cmk.tenant_id=globex");
                    PreparedStatement ps = c2.prepareStatement("UPDATE records SET c_int4 = ?, c_timestamp = ? WHERE id = ?")) {
                ps.setInt(1, 42);
                ps.setObject(2, LocalDateTime.of(2010, 10, 10, 10, 10, 10, 500_000_000));
                ps.setInt(3, 11);
                expect(ps.executeUpdate(), 1, "update count");
                try (PreparedStatement sel = c2.prepareStatement("SELECT c_int4, c_timestamp, c_text FROM records WHERE id = ?")) {
                    sel.setInt(1, 11);
                    try (ResultSet rs = sel.executeQuery()) {
                        rs.next();
                        expect(rs.getInt(1) + "|" + rs.getTimestamp(2) + "|" + rs.getString(3),
                            "42|2010-10-10 10:10:10.5|" + fullText("globex"), "updated row");
                    }
                }
            }
        });

        check("SET cmk.tenant_id through the extended protocol; a row of another tenant is refused with KM004", () -> {
            try (Connection c2 = proxy(null); Statement s = c2.createStatement()) {
                s.execute("SET cmk.tenant_id = 'acme'");
                String state = sqlState(() -> {
                    try (PreparedStatement ps = c2.prepareStatement(
                            "INSERT INTO records (id, tenant_id, c_text) VALUES (?, ?, ?)")) {
                        ps.setInt(1, 99);
                        ps.setString(2, "globex");
                        ps.setString(3, "wrong tenant");
                        ps.executeUpdate();
                    }
                });
                if (!state.startsWith("KM004")) {
                    throw new AssertionError("expected KM004, got " + state);
                }
                try (PreparedStatement ps = c2.prepareStatement("UPDATE records SET c_varchar = ? WHERE id = ?")) {
                    ps.setString(1, "pinned to acme");
                    ps.setInt(2, 3);
                    expect(ps.executeUpdate(), 1, "update count");
                }
                try (ResultSet rs = s.executeQuery("SELECT c_varchar FROM records WHERE id = 3")) {
                    rs.next();
                    expect(rs.getString(1), "pinned to acme", "row 3");
                }
            }
        });

        check("upsert: ON CONFLICT (id) DO UPDATE SET c = EXCLUDED.c (conflicting and new row)", () -> {
            try (PreparedStatement ps = c.prepareStatement(
                    "INSERT INTO records (id, tenant_id, c_text, c_numeric, c_uuid) VALUES (?, ?, ?, ?, ?) "
                    + "ON CONFLICT (id) DO UPDATE SET c_text = EXCLUDED.c_text, c_numeric = EXCLUDED.c_numeric, "
                    + "c_uuid = EXCLUDED.c_uuid")) {
                UUID u = UUID.fromString("11111111-2222-3333-4444-555555555555");
                Object[][] rows = {{1, "acme", "upserted ✓", new BigDecimal("1.50"), u}, {4, "acme", "new via upsert", new BigDecimal("2"), null}};
                for (Object[] r : rows) {
                    ps.setInt(1, (Integer) r[0]);
                    ps.setString(2, (String) r[1]);
                    ps.setString(3, (String) r[2]);
                    ps.setBigDecimal(4, (BigDecimal) r[3]);
                    bind(ps, 5, Types.OTHER, r[4]);
                    expect(ps.executeUpdate(), 1, "upsert count");
                }
            }
            List<String> got = new ArrayList<>();
            try (Statement s = c.createStatement();
                    ResultSet rs = s.executeQuery("SELECT id, c_text, c_numeric, c_uuid, c_int2 FROM records WHERE id IN (1, 4) ORDER BY id")) {
                while (rs.next()) {
                    got.add(rs.getInt(1) + "|" + rs.getString(2) + "|" + rs.getBigDecimal(3) + "|" + rs.getObject(4) + "|" + rs.getObject(5));
                }
            }
            expect(got, List.of("1|upserted ✓|1.50|11111111-2222-3333-4444-555555555555|-32768", "4|new via upsert|2|null|null"), "upserted rows");
        });

        check("legacy setDate / setTimestamp (sent untyped with an offset: '2024-02-29 +00')", () -> {
            try (PreparedStatement ps = c.prepareStatement(
                    "INSERT INTO records (id, tenant_id, c_date, c_timestamp, c_timestamptz) VALUES (?, ?, ?, ?, ?)")) {
                ps.setInt(1, 200);
                ps.setString(2, "acme");
                ps.setDate(3, java.sql.Date.valueOf("2024-02-29"));
                ps.setTimestamp(4, Timestamp.valueOf("2024-02-29 23:59:59.123456"));
                ps.setTimestamp(5, Timestamp.from(Instant.parse("1969-07-21T00:17:40Z")));
                expect(ps.executeUpdate(), 1, "insert count");
            }
            try (PreparedStatement ps = c.prepareStatement("UPDATE records SET c_date = ? WHERE id = ? AND tenant_id = ?")) {
                ps.setDate(1, java.sql.Date.valueOf("1999-12-31"));
                ps.setInt(2, 200);
                ps.setString(3, "acme");
                expect(ps.executeUpdate(), 1, "update count");
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT c_date, c_timestamp, c_timestamptz FROM records WHERE id = ?")) {
                ps.setInt(1, 200);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    expect(rs.getDate(1) + "|" + rs.getTimestamp(2) + "|" + rs.getTimestamp(3).toInstant(),
                        "1999-12-31|2024-02-29 23:59:59.123456|1969-07-21T00:17:40Z", "row 200");
                }
            }
        });

        check("at rest (direct connection): every cell an envelope, EDEK and blind index set, NULLs stay NULL", () -> {
            StringBuilder cells = new StringBuilder();
            for (String col : COLS) {
                cells.append(cells.length() == 0 ? "" : ", ").append("(").append(col).append(")");
            }
            try (Statement s = direct.createStatement()) {
                try (ResultSet rs = s.executeQuery("SELECT count(cell), count(*) FILTER (WHERE substr(cell, 1, 4) = '\\x434d4b01'::bytea) FROM records, LATERAL (VALUES " + cells + ") AS v(cell)")) {
                    rs.next();
                    if (rs.getLong(1) < 50) {
                        throw new AssertionError("only " + rs.getLong(1) + " cells at rest");
                    }
                    expect(rs.getLong(2), rs.getLong(1), "cells starting with CMK\\x01");
                }
                String cols = String.join(", ", COLS);
                try (ResultSet rs = s.executeQuery("SELECT count(*) FROM records WHERE (num_nonnulls(" + cols + ") > 0 AND (cmk_edek IS NULL OR jsonb_typeof(cmk_edek) <> 'object' OR cmk_edek = '{}')) OR (c_text IS NULL) <> (c_text_bidx IS NULL)")) {
                    rs.next();
                    expect(rs.getLong(1), 0L, "rows without EDEK or with a missing blind index");
                }
                try (ResultSet rs = s.executeQuery("SELECT string_agg(num_nulls(" + cols + ")::text, ',' ORDER BY id) FROM records WHERE id IN (2, 12)")) {
                    rs.next();
                    expect(rs.getString(1), "14,14", "NULL cells");
                }
                List<byte[]> secrets = new ArrayList<>();
                for (String p : List.of("Zoë", "varchar ✓", "12345.6789", "2024-02-29", uuidOf("acme").toString(), "nested", BIG.substring(0, 16))) {
                    secrets.add(p.getBytes(StandardCharsets.UTF_8));
                }
                secrets.add(new byte[] {0, 1, 0x7f, (byte) 0x80, (byte) 0xff});
                try (ResultSet rs = s.executeQuery("SELECT " + cols + " FROM records")) {
                    while (rs.next()) {
                        for (int i = 1; i <= COLS.length; i++) {
                            byte[] cell = rs.getBytes(i);
                            if (cell == null) {
                                continue;
                            }
                            String hay = new String(cell, StandardCharsets.ISO_8859_1);
                            for (byte[] secret : secrets) {
                                if (hay.contains(new String(secret, StandardCharsets.ISO_8859_1))) {
                                    throw new AssertionError("plaintext " + new String(secret, StandardCharsets.UTF_8) + " at rest in " + COLS[i - 1]);
                                }
                            }
                        }
                    }
                }
            }
        });

        check("KM003 for WHERE on a protected column (names table and column); the connection stays usable", () -> {
            String state = sqlState(() -> {
                try (PreparedStatement ps = c.prepareStatement("SELECT id FROM records WHERE c_int4 = ?")) {
                    ps.setInt(1, 42);
                    ps.executeQuery().close();
                }
            });
            if (!state.startsWith("KM003") || !state.contains("public.records") || !state.contains("c_int4")) {
                throw new AssertionError("expected KM003 naming public.records and c_int4, got " + state);
            }
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT count(*) FROM records WHERE id < 50")) {
                rs.next();
                expect(rs.getLong(1), 7L, "usable after KM003");
            }
        });

        check("equality lookup on the searchable c_text through the blind index: tenant in WHERE, = ANY", () -> {
            for (String tenant : new String[] {"acme", "globex"}) {
                java.util.Map<Integer, String> stored = new java.util.TreeMap<>();
                try (PreparedStatement ps = c.prepareStatement("SELECT id, c_text FROM records WHERE tenant_id = ?")) {
                    ps.setString(1, tenant);
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) stored.put(rs.getInt(1), rs.getString(2));
                    }
                }
                java.util.List<String> texts = new java.util.ArrayList<>(new java.util.TreeSet<>(
                    stored.values().stream().filter(Objects::nonNull).toList()));
                for (String text : texts) {
                    java.util.List<Integer> want = stored.entrySet().stream()
                        .filter(e -> text.equals(e.getValue())).map(java.util.Map.Entry::getKey).toList();
                    java.util.List<Integer> got = new java.util.ArrayList<>();
                    try (PreparedStatement ps = c.prepareStatement(
                            "SELECT id FROM records WHERE tenant_id = ? AND c_text = ? ORDER BY id")) {
                        ps.setString(1, tenant);
                        ps.setString(2, text);
                        try (ResultSet rs = ps.executeQuery()) {
                            while (rs.next()) got.add(rs.getInt(1));
                        }
                    }
                    expect(got, want, tenant + ": c_text = ?");
                }
                java.util.List<Integer> got = new java.util.ArrayList<>();
                try (PreparedStatement ps = c.prepareStatement(
                        "SELECT id FROM records WHERE tenant_id = ? AND c_text = ANY(?) ORDER BY id")) {
                    ps.setString(1, tenant);
                    ps.setArray(2, c.createArrayOf("text", texts.toArray()));
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) got.add(rs.getInt(1));
                    }
                }
                expect(got, stored.entrySet().stream().filter(e -> e.getValue() != null)
                    .map(java.util.Map.Entry::getKey).toList(), tenant + ": c_text = ANY(?)");
            }
        });

        check("KM003 inside a transaction fails the server transaction too: COMMIT keeps nothing of it", () -> {
            try (Connection c2 = proxy(null)) {
                c2.setAutoCommit(false);
                try (PreparedStatement ps = c2.prepareStatement("INSERT INTO records (id, tenant_id, c_text) VALUES (?, ?, ?)")) {
                    ps.setInt(1, 300);
                    ps.setString(2, "acme");
                    ps.setString(3, "half of the work");
                    ps.executeUpdate();
                }
                String state = sqlState(() -> {
                    try (PreparedStatement ps = c2.prepareStatement("SELECT id FROM records WHERE c_int4 = ?")) {
                        ps.setInt(1, 1);
                        ps.executeQuery().close();
                    }
                });
                if (!state.startsWith("KM003")) {
                    throw new AssertionError("expected KM003, got " + state);
                }
                String next = sqlState(() -> {
                    try (Statement s = c2.createStatement()) {
                        s.executeQuery("SELECT 1").close();
                    }
                });
                if (!next.startsWith("25P02")) {
                    throw new AssertionError("expected 25P02 after KM003 in the transaction, got " + next);
                }
                sqlState(c2::commit);
            }
            try (Statement s = direct.createStatement(); ResultSet rs = s.executeQuery("SELECT count(*) FROM records WHERE id = 300")) {
                rs.next();
                expect(rs.getLong(1), 0L, "rows of the failed transaction");
            }
        });

        check("revoke " + revoked + ": KM001 naming the tenant; " + other
                + " keeps reading and writing on the same connection and prepared statement", () -> {
            try (PreparedStatement ps = c.prepareStatement(SELECT + " WHERE tenant_id = ? AND id < 50 ORDER BY id")) {
                for (int i = 0; i < 6; i++) { // past prepareThreshold: a named statement from here on
                    ps.setString(1, other);
                    query(ps);
                }
                run(revokeCmd);
                long deadline = System.nanoTime() + 10_000_000_000L; // hang guard; approval_ttl is 1 s
                String state;
                while (true) {
                    ps.setString(1, revoked);
                    state = sqlState(() -> query(ps));
                    if (!state.equals("no error") || System.nanoTime() > deadline) {
                        break;
                    }
                    Thread.sleep(200);
                }
                if (!state.startsWith("KM001") || !state.contains(revoked)) {
                    throw new AssertionError("expected KM001 naming " + revoked + ", got " + state);
                }
                ps.setString(1, other);
                expect(query(ps).size(), 4, other + " rows through the same prepared statement");
                expect(ps.unwrap(PGStatement.class).isUseServerPrepare(), true, "server-prepared");
                try (PreparedStatement ins = c.prepareStatement("INSERT INTO records (id, tenant_id, c_text) VALUES (?, ?, ?)")) {
                    ins.setInt(1, 5);
                    ins.setString(2, other);
                    ins.setString(3, "written while revoked");
                    expect(ins.executeUpdate(), 1, "insert of " + other);
                    ins.setInt(1, 15);
                    ins.setString(2, revoked);
                    ins.setString(3, "refused");
                    String w = sqlState(ins::executeUpdate);
                    if (!w.startsWith("KM001")) {
                        throw new AssertionError("write of the revoked tenant: expected KM001, got " + w);
                    }
                }
            }
        });

        check("restore " + revoked + ": its rows read again", () -> {
            run(restoreCmd);
            try (PreparedStatement ps = c.prepareStatement(SELECT + " WHERE tenant_id = ? AND id < 50 ORDER BY id")) {
                ps.setString(1, revoked);
                long deadline = System.nanoTime() + 10_000_000_000L;
                String state;
                while (true) {
                    state = sqlState(() -> query(ps));
                    if (state.equals("no error") || System.nanoTime() > deadline) {
                        break;
                    }
                    Thread.sleep(200);
                }
                expect(state, "no error", "read after restore");
                expect(query(ps).get(0).get(3), fullText(revoked), "c_text of the first row");
            }
        });

        c.close();
        direct.close();
        finish();
    }

    static void finish() {
        System.out.println("java-encrypted: " + passed + " passed, " + failed + " failed, " + skipped + " skipped");
        System.exit(failed == 0 ? 0 : 1);
    }
}
