// A small pgjdbc client driven by tests/integration/test_jdbc.py.
//
// Usage: java -cp <classes>:<postgresql.jar> Probe <jdbc-url> <user> <password> <scenario> [arg ...]
//
// Output: one result per line, fields separated by a tab, the first field a keyword
// (ROW, COUNT, ERR, ...). Field values have backslash, tab, CR and LF escaped as \\ \t \r \n;
// SQL NULL is written \N.
// The last line is "DONE" on success. An unexpected exception prints
// "EXC <sqlstate> <class>: <message>" (and the stack trace on stderr) and exits with 2.
// Expected errors (the scenario provokes them) are printed as ordinary result lines.

import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.PrintStream;
import java.io.StringReader;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicReference;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public final class Probe {
    private static final PrintStream OUT =
        new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);

    private static String url;
    private static String user;
    private static String password;

    public static void main(String[] args) {
        if (args.length < 4) {
            System.err.println("usage: Probe <jdbc-url> <user> <password> <scenario> [arg ...]");
            System.exit(64);
        }
        url = args[0];
        user = args[1];
        password = args[2];
        String scenario = args[3];
        String arg = args.length > 4 ? args[4] : null;
        try {
            switch (scenario) {
                case "prepared": prepared(); break;
                case "cancel": cancel(); break;
                case "copy": copy(arg); break;
                case "notify": notifyScenario(arg); break;
                case "txerror": txError(); break;
                case "batch": batch(arg); break;
                case "fetch": fetch(); break;
                case "query": query(arg); break;
                default:
                    System.err.println("unknown scenario " + scenario);
                    System.exit(64);
            }
            out("DONE");
        } catch (Throwable t) {
            String state = t instanceof SQLException ? ((SQLException) t).getSQLState() : "";
            out("EXC", state, t.getClass().getName() + ": " + t.getMessage());
            t.printStackTrace();
            System.exit(2);
        }
        System.exit(0);
    }

    // --- output -------------------------------------------------------------------------------

    private static String esc(Object v) {
        if (v == null) {
            return "\\N";
        }
        StringBuilder sb = new StringBuilder();
        for (char c : String.valueOf(v).toCharArray()) {
            switch (c) {
                case '\\': sb.append("\\\\"); break;
                case '\t': sb.append("\\t"); break;
                case '\n': sb.append("\\n"); break;
                case '\r': sb.append("\\r"); break;
                default: sb.append(c);
            }
        }
        return sb.toString();
    }

    private static void out(Object... fields) {
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < fields.length; i++) {
            if (i > 0) {
                sb.append('\t');
            }
            sb.append(esc(fields[i]));
        }
        OUT.println(sb);
    }

    private static Connection connect() throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", user);
        p.setProperty("password", password);
        p.setProperty("connectTimeout", "10");
        p.setProperty("socketTimeout", "60");
        return DriverManager.getConnection(url, p);
    }

    private static long scalarLong(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    // --- scenarios ------------------------------------------------------------------------------

    /** One PreparedStatement executed 10 times (server-side named statement after prepareThreshold). */
    private static void prepared() throws SQLException {
        try (Connection c = connect()) {
            try (PreparedStatement ps = c.prepareStatement("SELECT id, name FROM guests WHERE id = ?")) {
                for (int i = 1; i <= 10; i++) {
                    boolean server = ((PGStatement) ps).isUseServerPrepare();
                    ps.setLong(1, i);
                    int n = 0;
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) {
                            out("ROW", i, server, rs.getLong(1), rs.getString(2));
                            n++;
                        }
                    }
                    out("N", i, n);
                }
            }
            // Several parameters of different types, also re-executed past the threshold.
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + ?::int, upper(?::text), ?::numeric * 2")) {
                for (int i = 1; i <= 7; i++) {
                    ps.setInt(1, i);
                    ps.setInt(2, 100);
                    ps.setString(3, "x" + i);
                    ps.setBigDecimal(4, new java.math.BigDecimal(i + ".25"));
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        out("CALC", i, rs.getInt(1), rs.getString(2), rs.getBigDecimal(3).toPlainString());
                    }
                }
            }
            // The named statements the server holds for this session (none in simple query mode).
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery("SELECT name, statement FROM pg_prepared_statements"
                     + " WHERE statement LIKE 'SELECT id, name FROM guests%' ORDER BY name")) {
                while (rs.next()) {
                    out("PREPARED", rs.getString(1), rs.getString(2));
                }
            }
        }
    }

    /** Statement.cancel() from another thread while pg_sleep(30) runs. */
    private static void cancel() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            out("PID", ((PGConnection) c).getBackendPID());
            AtomicReference<Throwable> cancelError = new AtomicReference<>();
            Thread canceller = new Thread(() -> {
                try {
                    Thread.sleep(1000);
                    st.cancel();
                } catch (Throwable t) {
                    cancelError.set(t);
                }
            });
            long t0 = System.nanoTime();
            canceller.start();
            try {
                st.execute("SELECT pg_sleep(30)");
                out("CANCEL", "none", (System.nanoTime() - t0) / 1_000_000);
            } catch (SQLException e) {
                out("CANCEL", e.getSQLState(), (System.nanoTime() - t0) / 1_000_000, e.getMessage());
            }
            canceller.join(10000);
            if (cancelError.get() != null) {
                out("CANCEL_CALL_FAILED", cancelError.get().toString());
            }
            // The session is still usable after the cancel.
            out("AFTER", scalarLong(c, "SELECT 41 + 1"));
        }
    }

    /** COPY FROM STDIN through CopyManager, then COPY TO STDOUT, then count/sum. */
    private static void copy(String table) throws Exception {
        try (Connection c = connect()) {
            CopyManager cm = ((PGConnection) c).getCopyAPI();
            StringBuilder data = new StringBuilder();
            for (int i = 1; i <= 5000; i++) {
                data.append(i).append('\t').append("note ").append(i).append(" \u5ba2\u4eba").append('\n');
            }
            long copied = cm.copyIn("COPY " + table + " (id, note) FROM STDIN", new StringReader(data.toString()));
            out("COPIED", copied);
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery(
                     "SELECT count(*), sum(id), max(note) FILTER (WHERE id = 7) FROM " + table)) {
                rs.next();
                out("COUNT", rs.getLong(1), rs.getLong(2), rs.getString(3));
            }
            StringWriter w = new StringWriter();
            long outRows = cm.copyOut(
                "COPY (SELECT id, note FROM " + table + " WHERE id <= 3 ORDER BY id) TO STDOUT", w);
            out("COPYOUT", outRows, w.toString());
        }
    }

    /** LISTEN on A, NOTIFY from B, A receives it with B's backend pid. */
    private static void notifyScenario(String channel) throws SQLException {
        String ch = channel == null ? "ch" : channel;
        try (Connection a = connect(); Connection b = connect()) {
            try (Statement st = a.createStatement()) {
                st.execute("LISTEN " + ch);
            }
            int bPid = ((PGConnection) b).getBackendPID();
            out("BPID", bPid, scalarLong(b, "SELECT pg_backend_pid()"));
            out("APID", ((PGConnection) a).getBackendPID(), scalarLong(a, "SELECT pg_backend_pid()"));
            try (Statement st = b.createStatement()) {
                st.execute("NOTIFY " + ch + ", 'hello'");
            }
            long t0 = System.nanoTime();
            PGNotification[] ns = ((PGConnection) a).getNotifications(5000);
            long ms = (System.nanoTime() - t0) / 1_000_000;
            if (ns == null || ns.length == 0) {
                out("NONE", ms);
            } else {
                for (PGNotification n : ns) {
                    out("NOTIFY", n.getName(), n.getParameter(), n.getPID());
                }
            }
            // A is still usable after the asynchronous message.
            out("AFTER", scalarLong(a, "SELECT 7"));
        }
    }

    /** Autocommit off: an error aborts the transaction (25P02) until rollback. */
    private static void txError() throws SQLException {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            try (Statement st = c.createStatement()) {
                out("FIRST", scalarLong(c, "SELECT 1"));
                try {
                    st.executeQuery("SELECT 1/0");
                    out("ERR1", "none");
                } catch (SQLException e) {
                    out("ERR1", e.getSQLState(), e.getMessage());
                }
                try {
                    st.executeQuery("SELECT 2");
                    out("ERR2", "none");
                } catch (SQLException e) {
                    out("ERR2", e.getSQLState(), e.getMessage());
                }
                c.rollback();
                out("AFTER", scalarLong(c, "SELECT 3"));
                // Also through a PreparedStatement (extended protocol with parameters).
                try (PreparedStatement ps = c.prepareStatement("SELECT 10 / ?")) {
                    ps.setInt(1, 0);
                    try {
                        ps.executeQuery();
                        out("ERR3", "none");
                    } catch (SQLException e) {
                        out("ERR3", e.getSQLState(), e.getMessage());
                    }
                    ps.setInt(1, 5);
                    try {
                        ps.executeQuery();
                        out("ERR4", "none");
                    } catch (SQLException e) {
                        out("ERR4", e.getSQLState(), e.getMessage());
                    }
                    c.rollback();
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        out("AFTER2", rs.getInt(1));
                    }
                }
                c.commit();
            }
        }
    }

    /** addBatch/executeBatch: many Parse/Bind/Execute before one Sync; then a batch with a failing row. */
    private static void batch(String table) throws SQLException {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            int[] counts;
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + table + " (id, note) VALUES (?, ?)")) {
                for (int i = 1; i <= 1000; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "row " + i);
                    ps.addBatch();
                }
                counts = ps.executeBatch();
            }
            long sum = 0;
            int other = 0;
            for (int n : counts) {
                if (n == 1) {
                    sum += n;
                } else {
                    other++;
                }
            }
            out("BATCH", counts.length, sum, other);
            c.commit();
            out("COUNT", scalarLong(c, "SELECT count(*) FROM " + table), scalarLong(c, "SELECT sum(id) FROM " + table));
            c.commit();
            // A batch whose 6th row violates the primary key: nothing of it stays after rollback.
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + table + " (id, note) VALUES (?, ?)")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, i == 5 ? 1 : 2001 + i);
                    ps.setString(2, "dup " + i);
                    ps.addBatch();
                }
                try {
                    ps.executeBatch();
                    out("BATCHERR", "none");
                } catch (BatchUpdateException e) {
                    SQLException next = e.getNextException();
                    out("BATCHERR", e.getSQLState(), next == null ? "" : next.getSQLState());
                }
            }
            c.rollback();
            out("COUNT2", scalarLong(c, "SELECT count(*) FROM " + table),
                scalarLong(c, "SELECT sum(id) FROM " + table));
            c.commit();
        }
    }

    /** Any one statement: its rows, each column as a string. */
    private static void query(String sql) throws SQLException {
        try (Connection c = connect(); Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            int n = rs.getMetaData().getColumnCount();
            while (rs.next()) {
                Object[] row = new Object[n + 1];
                row[0] = "ROW";
                for (int i = 1; i <= n; i++) {
                    row[i] = rs.getString(i);
                }
                out(row);
            }
        }
    }

    /** setFetchSize(1000) in a transaction: Execute with max_rows, PortalSuspended, Execute again ... */
    private static void fetch() throws SQLException {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            try (Statement st = c.createStatement()) {
                st.setFetchSize(1000);
                long count = 0;
                long sum = 0;
                try (ResultSet rs = st.executeQuery("SELECT g FROM generate_series(1,100000) g")) {
                    while (rs.next()) {
                        count++;
                        sum += rs.getLong(1);
                    }
                }
                out("FETCH", count, sum);
            }
            c.commit();
            out("AFTER", scalarLong(c, "SELECT 5"));
        }
    }
}
