// pgJDBC session through cmk-proxy: TLS (sslrootcert = PGSSLROOTCERT) + SCRAM,
// DDL, insert/select, server-side PreparedStatement (prepareThreshold=1)
// executed several times, rollback, COPY in and out (CopyManager), cancel of a
// running pg_sleep(30) with Statement.cancel() from another thread, drop.
// Env: DATABASE_URL (postgres://user:pw@host:port/db?sslmode=...), PGSSLROOTCERT.
// Build: javac -cp /usr/share/java/postgresql.jar -d build Session.java
// Run:   java -cp /usr/share/java/postgresql.jar:build Session
// Exits non-zero if any check fails; prints "java: N passed, M failed, K skipped".

import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicReference;

import org.postgresql.PGConnection;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public class Session {
    interface Check {
        void run() throws Exception;
    }

    static int passed = 0, failed = 0, skipped = 0;
    static String jdbcUrl;
    static Properties props = new Properties();

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
            throw new AssertionError(what + ": expected " + want + ", got " + got);
        }
    }

    static Connection connect() throws SQLException {
        return DriverManager.getConnection(jdbcUrl, props);
    }

    static long count(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static void parseUrl(String url) throws Exception {
        URI u = new URI(url);
        String db = u.getPath() == null ? "" : u.getPath().replaceFirst("^/", "");
        int port = u.getPort() == -1 ? 5432 : u.getPort();
        jdbcUrl = "jdbc:postgresql://" + u.getHost() + ":" + port + "/" + db;
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
        if (ca != null && !ca.isEmpty()) {
            props.setProperty("sslrootcert", ca);
        }
        props.setProperty("prepareThreshold", "1");
        props.setProperty("connectTimeout", "20");
        props.setProperty("ApplicationName", "cmk-proxy-jdbc-session");
    }

    public static void main(String[] args) throws Exception {
        String url = System.getenv("DATABASE_URL");
        if (url == null || url.isEmpty()) {
            System.err.println("DATABASE_URL must be set");
            System.exit(2);
        }
        parseUrl(url);
        String table = "java_t_" + ProcessHandle.current().pid() + "_" + (System.currentTimeMillis() % 100000);
        AtomicReference<Connection> connRef = new AtomicReference<>();

        check("connect over TLS as scram_user", () -> {
            Connection c = connect();
            connRef.set(c);
            try (Statement s = c.createStatement();
                    ResultSet rs = s.executeQuery("SELECT current_user, current_database()")) {
                rs.next();
                expect(rs.getString(1) + "/" + rs.getString(2), "scram_user/app", "user/database");
            }
        });
        Connection c = connRef.get();
        if (c == null) {
            finish();
            return;
        }

        check("create table", () -> {
            try (Statement s = c.createStatement()) {
                s.execute("CREATE TABLE " + table
                        + " (id int PRIMARY KEY, name text NOT NULL, amount numeric(10,2), data bytea)");
            }
        });

        check("insert and select", () -> {
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO " + table
                        + " VALUES (1, 'alice', 10.50, '\\x0001'), (2, 'bob', 20.25, NULL), (3, 'carol é', NULL, '')");
                List<String> got = new ArrayList<>();
                try (ResultSet rs = s.executeQuery("SELECT id, name, amount, data FROM " + table + " ORDER BY id")) {
                    while (rs.next()) {
                        byte[] d = rs.getBytes(4);
                        got.add(rs.getInt(1) + "|" + rs.getString(2) + "|" + rs.getBigDecimal(3) + "|"
                                + (d == null ? "null" : d.length));
                    }
                }
                expect(got, List.of("1|alice|10.50|2", "2|bob|20.25|null", "3|carol é|null|0"), "rows");
            }
        });

        check("server-side PreparedStatement executed 6 times", () -> {
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + table + " (id, name, amount) VALUES (?, ?, ?)");
                    PreparedStatement sel = c.prepareStatement("SELECT name, amount FROM " + table + " WHERE id = ?")) {
                for (int i = 10; i < 16; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "p" + i);
                    ins.setBigDecimal(3, new BigDecimal(i + ".75"));
                    expect(ins.executeUpdate(), 1, "insert count");
                }
                for (int i = 10; i < 16; i++) {
                    sel.setInt(1, i);
                    try (ResultSet rs = sel.executeQuery()) {
                        expect(rs.next(), true, "row " + i + " present");
                        expect(rs.getString(1) + "/" + rs.getBigDecimal(2), "p" + i + "/" + i + ".75", "row " + i);
                    }
                }
                expect(ins.unwrap(PGStatement.class).isUseServerPrepare(), true, "insert uses server prepare");
                expect(sel.unwrap(PGStatement.class).isUseServerPrepare(), true, "select uses server prepare");
                long named = count(c, "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql");
                if (named < 2) {
                    throw new AssertionError("expected >= 2 protocol-level prepared statements, got " + named);
                }
            }
        });

        check("transaction rollback", () -> {
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO " + table + " (id, name) VALUES (100, 'ghost')");
                expect(count(c, "SELECT count(*) FROM " + table + " WHERE id = 100"), 1L, "inside transaction");
                c.rollback();
            } finally {
                c.setAutoCommit(true);
            }
            expect(count(c, "SELECT count(*) FROM " + table + " WHERE id = 100"), 0L, "after rollback");
        });

        check("COPY in and out (CopyManager)", () -> {
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder in = new StringBuilder();
            for (int i = 1000; i < 1500; i++) {
                in.append(i).append('\t').append("copy row ").append(i).append('\t').append(i).append(".25\n");
            }
            long n = cm.copyIn("COPY " + table + " (id, name, amount) FROM STDIN", new StringReader(in.toString()));
            expect(n, 500L, "rows copied in");
            StringWriter out = new StringWriter();
            long m = cm.copyOut("COPY (SELECT id, name, amount FROM " + table
                    + " WHERE id >= 1000 ORDER BY id) TO STDOUT", out);
            expect(m, 500L, "rows copied out");
            expect(out.toString(), in.toString(), "COPY TO STDOUT text");
        });

        check("Statement.cancel() of pg_sleep(30) -> 57014", () -> {
            AtomicReference<Throwable> watcherError = new AtomicReference<>();
            try (Statement s = c.createStatement()) {
                Thread watcher = new Thread(() -> {
                    try (Connection w = connect()) {
                        long deadline = System.nanoTime() + 25_000_000_000L;
                        while (System.nanoTime() < deadline) {
                            long active = count(w, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                                    + " AND query LIKE 'SELECT pg_sleep(30)%' AND usename = current_user"
                                    + " AND pid <> pg_backend_pid()");
                            if (active > 0) {
                                s.cancel();
                                return;
                            }
                            Thread.sleep(50);
                        }
                        watcherError.set(new AssertionError("pg_sleep(30) never showed up as active"));
                    } catch (Throwable e) {
                        watcherError.set(e);
                    }
                });
                watcher.start();
                String state = null;
                try {
                    s.executeQuery("SELECT pg_sleep(30)");
                } catch (SQLException e) {
                    state = e.getSQLState();
                }
                watcher.join();
                if (watcherError.get() != null) {
                    throw new AssertionError("watcher failed", watcherError.get());
                }
                expect(state, "57014", "SQLSTATE of the cancelled query");
            }
            expect(count(c, "SELECT 42"), 42L, "connection usable after cancel");
        });

        check("drop table", () -> {
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE " + table);
                try (ResultSet rs = s.executeQuery("SELECT to_regclass('" + table + "')")) {
                    rs.next();
                    expect(rs.getString(1), null, "to_regclass");
                }
            }
        });

        c.close();
        finish();
    }

    static void finish() {
        System.out.println("java: " + passed + " passed, " + failed + " failed, " + skipped + " skipped");
        System.exit(failed == 0 ? 0 : 1);
    }
}
