// A JeroMQ client (Debian's libjeromq-java 0.3.6, which speaks ZMTP 2.0), for
// tests/test_interop.py: COUNT requests through the gatekeeper to an echo broker, each
// checked against its reply.
//
//     java -cp jeromq.jar:. EchoClient ENDPOINT COUNT IDENTITY
//
// Prints "jeromq ok COUNT" and exits 0, or names the first mismatch and exits 1.

import org.zeromq.ZMQ;

public class EchoClient {
    public static void main(String[] args) {
        String endpoint = args[0];
        int count = Integer.parseInt(args[1]);
        ZMQ.Context context = ZMQ.context(1);
        ZMQ.Socket socket = context.socket(ZMQ.DEALER);
        socket.setIdentity(args[2].getBytes());
        socket.setReceiveTimeOut(5000);
        socket.setLinger(0);
        socket.connect(endpoint);
        for (int i = 0; i < count; i++) {
            byte[] body = ("request " + i + " " + "x".repeat(i % 280)).getBytes();
            socket.send(new byte[0], ZMQ.SNDMORE);
            socket.send(body, 0);
            byte[] delimiter = socket.recv(0);
            byte[] reply = delimiter == null ? null : socket.recv(0);
            if (delimiter == null || delimiter.length != 0 || reply == null
                    || !java.util.Arrays.equals(reply, body)) {
                System.err.println("reply " + i + " is not its request");
                System.exit(1);
            }
        }
        System.out.println("jeromq ok " + count);
        socket.close();
        context.term();
        System.exit(0);
    }
}
